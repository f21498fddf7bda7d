"""migrate() turns the cyclic garbage collector off for its downtime; moves running at once in two threads of one
process share it: the collector comes back on when the last one ends, and only if it was on before."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sockrepair.move.migrate import _gc_off, _gc_on


@pytest.fixture
def collector() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_the_last_of_two_moves_turns_it_back_on(collector: None) -> None:
    gc.enable()
    _gc_off()
    _gc_off()
    _gc_on()
    assert not gc.isenabled()  # the other move is still in its downtime
    _gc_on()
    assert gc.isenabled()


def test_off_before_the_move_stays_off(collector: None) -> None:
    gc.disable()
    _gc_off()
    _gc_on()
    assert not gc.isenabled()
