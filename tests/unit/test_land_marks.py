"""move/land.py's SO_MARK helpers, which `restore -D` uses over its stretch from the delivery to the unlock: the
marks read back, and the saved ones go back to as many sockets as were restored when that is fewer than the states
(an error path must not raise from its cleanup)."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator

import pytest

from sockrepair.lock.ruleset import SOCCR_MARK
from sockrepair.move.land import give_saved_marks, mark_passing
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN")


def _state(mark: int) -> ConnectionState:
    return ConnectionState(
        tuple=ConnTuple(socket.AF_INET, "10.0.0.1", 40000 + mark, "10.0.0.2", 443), tcp_state=1, send_seq=7,
        recv_seq=9, send_queue=b"", unsent_len=0, recv_queue=b"", options=TcpOptions(1460, True, True, True, 7, 9),
        window=RepairWindow(1, 2, 3, 4, 5), timestamp=777, sockopts=dataclasses.replace(SocketOptions(), mark=mark),
    )  # fmt: skip


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    made = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    yield made
    for s in made:
        s.close()


def _marks(socks: list[socket.socket]) -> list[int]:
    return [s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) for s in socks]


def test_marked_then_given_their_saved_marks(socks: list[socket.socket]) -> None:
    mark_passing(socks)
    assert _marks(socks) == [SOCCR_MARK, SOCCR_MARK]
    give_saved_marks(socks, [_state(0x11), _state(0)])
    assert _marks(socks) == [0x11, 0]


def test_fewer_sockets_than_states_get_their_own_marks(socks: list[socket.socket]) -> None:
    mark_passing(socks)
    give_saved_marks(socks[:1], [_state(0x21), _state(0x22), _state(0x23)])
    assert _marks(socks) == [0x21, SOCCR_MARK]
    give_saved_marks(socks, [_state(0x31)])
    assert _marks(socks) == [0x31, SOCCR_MARK]
