"""The ACK a moved socket may owe its peer (engine/_batch.py owed_acks, engine/_restore.py _ask_for_ack): migrate()
makes the restored socket send it only when the old socket's last segment did not acknowledge everything it
received, or was sent after the lock was taken (the lock dropped it); a quiet connection gets no extra segment."""

from __future__ import annotations

import os
import socket

import pytest

import sockrepair
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.lock import Locker
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import tcp_sockets
from sockrepair.netns import NetNS
from sockrepair.state import TCP_ESTABLISHED, ConnTuple
from tests.root.pairs import recv_exactly, tcp_info, wait_for
from tests.root.programs import echo_connection


def _keep_sockets(socks: list[socket.socket], _tuples: object) -> list[socket.socket]:
    return socks


def _segs(fd: int) -> tuple[int, int]:
    """(tcpi_segs_out, tcpi_segs_in) of the socket at `fd`."""
    borrowed = socket.socket(fileno=fd)
    try:
        out, in_ = tcpinfo.read(borrowed, "tcpi_segs_out", "tcpi_segs_in")
    finally:
        borrowed.detach()
    return int(out), int(in_)


def _unacked(sock: socket.socket) -> int:
    return tcpinfo.read(sock, "tcpi_unacked")[0]


def test_a_quiet_connection_gets_no_extra_segment() -> None:
    """An idle connection whose last segment acknowledged all it received, before the lock: the restored socket
    takes in no segment before the handoff (the owed ACK's segment used to be one), and the connection works."""
    with NetNS() as ns, echo_connection(ns) as (server, client):
        report = sockrepair.migrate(server.pid, dest_netns=ns.name, handoff=_keep_sockets)
        [restored] = report.handoff_result
        with restored:
            segs_in = _segs(restored.fileno())[1]
            client.sendall(b"after")
            assert recv_exactly(restored, 5) == b"after"
            restored.sendall(b"done")
            assert recv_exactly(client, 4) == b"done"
        assert segs_in == 0
        assert tcp_info(client)[2] == 0


def test_an_ack_the_lock_dropped_reaches_the_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte the frozen program's socket received just before the lock, its ACK delayed (the socket in pingpong
    mode: TCP_QUICKACK 0); the delayed ACK leaves after the lock, which drops it, so the saved window shows nothing
    owed (rcv_wup == rcv_nxt) and only tcpi_segs_out tells. The restored socket acknowledges the byte: the peer's
    unacked count drains with no retransmission (skipping the segment on the window alone fails this)."""
    with NetNS() as ns, echo_connection(ns) as (server, client):
        [theirs] = [s for s in tcp_sockets(server.pid) if s.tcp_state == TCP_ESTABLISHED]
        pidfd = PidFd(server.pid)
        copy = pidfd.getfd(theirs.fd)
        seen: dict[str, tuple[int, int]] = {}
        try:
            borrowed = socket.socket(fileno=copy)
            borrowed.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # pingpong: the next ACK is delayed
            borrowed.detach()
            real_lock = Locker.lock

            def lock_after_bytes(self: Locker, items: list[ConnTuple], *args: object, **kwargs: object) -> object:
                if copy < 0 or not items:
                    return real_lock(self, items, *args, **kwargs)
                # the program is frozen: the byte stays queued and only the delayed ACK acknowledges it
                seen["start"] = _segs(copy)
                client.sendall(b"x")
                wait_for(lambda: _segs(copy)[1] == seen["start"][1] + 1, "the byte to reach the frozen socket", 5.0)
                seen["arrived"] = _segs(copy)
                result = real_lock(self, items, *args, **kwargs)
                seen["locked"] = _segs(copy)
                wait_for(lambda: _segs(copy)[0] > seen["locked"][0], "the delayed ACK to fire", 5.0)
                return result

            def close_copy() -> None:
                nonlocal copy
                if copy >= 0:
                    os.close(copy)  # the socket lives on in the program: no FIN, and the 4-tuple is free at the end
                    copy = -1

            def lock_then_close(self: Locker, items: list[ConnTuple], *args: object, **kwargs: object) -> object:
                try:
                    return lock_after_bytes(self, items, *args, **kwargs)
                finally:
                    close_copy()

            monkeypatch.setattr(Locker, "lock", lock_then_close)
            report = sockrepair.migrate(server.pid, dest_netns=ns.name, handoff=_keep_sockets)
        finally:
            if copy >= 0:
                os.close(copy)
            pidfd.close()
        [restored] = report.handoff_result
        with restored:
            assert recv_exactly(restored, 1) == b"x"
            wait_for(lambda: _unacked(client) == 0, "the peer's byte to be acknowledged", 5.0)
            assert tcp_info(client)[2] == 0
        # what the test set out to make: the delayed ACK had not left before the lock
        assert seen["locked"][0] == seen["arrived"][0] == seen["start"][0]
