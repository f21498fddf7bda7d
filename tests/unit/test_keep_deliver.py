"""Keeper.deliver(): delivers until nothing more is kept (at most a few rounds), and a call after the unlock adds what
the lock stopped meanwhile to the totals (sockrepair.move.keep)."""

from __future__ import annotations

import socket
from collections.abc import Iterable

import pytest

from sockrepair.lock.record import Held
from sockrepair.move import keep
from sockrepair.move.keep import Keeper
from sockrepair.state import ConnTuple

CONN = ConnTuple(socket.AF_INET, "127.0.0.1", 7000, "127.0.0.1", 40000)


class Arrivals:
    """A recorder whose take() hands out one batch of packets per call, as if the peer kept sending meanwhile."""

    def __init__(self, batches: list[list[bytes]], fell_back: int = 0) -> None:
        self.batches = batches
        self.fell_back = fell_back

    def take(self, conns: Iterable[ConnTuple]) -> Held:
        return Held(self.batches.pop(0) if self.batches else [], lost=self.fell_back)

    def pending(self, conns: Iterable[ConnTuple]) -> int:
        return len(self.batches[0]) if self.batches else 0


def _keeper(monkeypatch: pytest.MonkeyPatch, recorder: Arrivals, sent: list[bytes]) -> Keeper:
    keeper = Keeper([])
    keeper._recorders = [recorder]  # type: ignore[list-item]

    def send(packets: list[bytes], into: str) -> int:
        sent.extend(packets)
        return len(packets)

    monkeypatch.setattr(keep, "send_kept", send)
    return keeper


def test_deliver_looks_again_until_nothing_more_came(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[bytes] = []
    keeper = _keeper(monkeypatch, Arrivals([[b"a", b"b"], [b"c"], []]), sent)
    kept = keeper.deliver([CONN], "/proc/thread-self/ns/net", before=[b"0"])
    assert sent == [b"0", b"a", b"b", b"c"]
    assert (kept.delivered, kept.fell_back, kept.recording) == (4, 0, True)


def test_a_peer_still_sending_leaves_the_rest_to_the_call_after_the_unlock(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[bytes] = []
    batches = [[bytes([n])] for n in range(keep._ROUNDS + 2)]
    keeper = _keeper(monkeypatch, Arrivals(batches, fell_back=1), sent)
    first = keeper.deliver([CONN], "/proc/thread-self/ns/net")
    assert first.delivered == keep._ROUNDS == len(sent)
    after_unlock = keeper.deliver([CONN], "/proc/thread-self/ns/net")
    assert sent == [bytes([n]) for n in range(keep._ROUNDS + 2)]
    assert (after_unlock.delivered, after_unlock.fell_back) == (keep._ROUNDS + 2, 1)  # totals, not added twice
