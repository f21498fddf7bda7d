"""drain() of a listener duplicate (sockrepair/move/backlog.py), on loopback: it accepts what waits, in order, within
the fd room it is given, and leaves the listener's open file as it found it (its other holders keep blocking)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

import pytest

from sockrepair.move import backlog
from sockrepair.state import ConnTuple


@contextlib.contextmanager
def _queued(listener: socket.socket, n: int) -> Iterator[list[socket.socket]]:
    """`n` connections waiting in `listener`'s accept queue, their client ends closed afterwards."""
    clients = [socket.create_connection(listener.getsockname()) for _ in range(n)]
    try:
        yield clients
    finally:
        for c in clients:
            c.close()


def _duplicate(lst: socket.socket) -> socket.socket:
    """What take_listeners() makes of a program's listener: a non-blocking object around a duplicate fd."""
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, os.dup(lst.fileno()))


def test_drain_accepts_what_waits_and_leaves_the_open_file_blocking(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with _queued(listener, 3) as clients:
        dup = _duplicate(listener)
        got = backlog.drain([dup])
        try:
            assert dup.fileno() == -1  # closed
            assert got.tuples == [ConnTuple(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", c.getsockname()[1])
                                  for c in clients]
            assert all(s.getblocking() for s in got.socks)
            # O_NONBLOCK was on the shared open file only while drain() accepted
            assert not fcntl.fcntl(listener.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
            clients[1].sendall(b"queued")
            assert got.socks[1].recv(6) == b"queued"
        finally:
            backlog.reset(got)


def test_drain_leaves_what_exceeds_its_fd_room_queued(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def room(reserve: int) -> int:
        seen.append(reserve)
        return 2  # counted after the first accept: 1 + 2

    monkeypatch.setattr(backlog, "_fd_room", room)
    with _queued(listener, 5) as clients:
        got = backlog.drain([_duplicate(listener)], reserve=7)
        try:
            assert seen == [7]
            assert [t.remote_port for t in got.tuples] == [c.getsockname()[1] for c in clients[:3]]
            listener.settimeout(5)
            left = [listener.accept()[1][1] for _ in range(2)]
            assert left == [c.getsockname()[1] for c in clients[3:]]
        finally:
            backlog.reset(got)


def test_drain_of_an_empty_queue_counts_no_fds(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_count(reserve: int) -> int:
        raise AssertionError("the fd room was counted for an empty queue")

    monkeypatch.setattr(backlog, "_fd_room", no_count)
    got = backlog.drain([_duplicate(listener)])
    assert got.socks == [] and got.tuples == []


def test_drain_without_room_for_one_leaves_the_queue_to_the_listener(listener: socket.socket,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The restore still has its sockets to make: with fewer fds free than it needs, nothing is kept (the first one
    accepted is let go), and the rest stays queued."""
    monkeypatch.setattr(backlog, "_fd_room", lambda reserve: -1)
    with _queued(listener, 3) as clients:
        got = backlog.drain([_duplicate(listener)], reserve=100)
        assert got.socks == [] and got.tuples == []
        listener.settimeout(5)
        assert [listener.accept()[1][1] for _ in range(2)] == [c.getsockname()[1] for c in clients[1:]]


def test_fd_room_keeps_the_reserve_free() -> None:
    soft = backlog.resource.getrlimit(backlog.resource.RLIMIT_NOFILE)[0]
    open_now = len(os.listdir("/proc/self/fd"))
    # listdir's own fd is counted while it lists: one either way
    assert abs(backlog._fd_room(10) - (soft - open_now - backlog.RESERVE_FDS - 10)) <= 1
