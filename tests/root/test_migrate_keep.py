"""migrate() keeps what peers send while their connections move: a request sent while the connection is locked
reaches the restored socket without the peer retransmitting (its tcpi_total_retrans stays 0), in one namespace and
from host A to host B of the lab; with keep=False the same request waits for the peer's retransmission."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import sockrepair
import sockrepair.move.migrate as migrate_module
from sockrepair.lab.hosts import SERVICE4, Lab
from sockrepair.lock import Locker
from sockrepair.lock.record import Recorder
from sockrepair.move.keep import Keeper, netns_path, read_kept, send_kept
from sockrepair.netns import NetNS
from tests.root.keeping import request_before_the_unlock
from tests.root.pairs import recv_exactly, tcp_info, wait_for
from tests.root.programs import echo_connection

REQUEST = b"GET /while-locked"


def _keep_sockets(socks: list[socket.socket], _tuples: object) -> list[socket.socket]:
    return socks


def _move(pid: int, dest_netns: str, network: Callable[[], None],
          keep: bool | sockrepair.KeepCaps) -> sockrepair.MigrationReport:
    return sockrepair.migrate(pid, dest_netns=dest_netns, network=network, handoff=_keep_sockets, keep=keep)


@pytest.mark.parametrize("keep", [True, False], ids=["keeping", "dropping"])
def test_a_request_sent_while_locked_arrives_without_retransmission(keep: bool) -> None:
    with NetNS() as ns:
        with echo_connection(ns) as (server, client):
            report = _move(server.pid, ns.name, lambda: client.sendall(REQUEST), keep)
            [restored] = report.handoff_result
            with restored:
                assert recv_exactly(restored, len(REQUEST)) == REQUEST
                retransmitted = tcp_info(client)[2]
                restored.sendall(b"200 OK")
                assert recv_exactly(client, 6) == b"200 OK"
        if keep:
            assert (report.kept.recording, report.kept.delivered, report.kept.fell_back) == (True, 1, 0)
            assert retransmitted == 0
            assert list(report.phases_ms).index("deliver") == list(report.phases_ms).index("restore") + 1
        else:
            assert not report.kept.recording and "deliver" not in report.phases_ms
            assert retransmitted >= 1  # what the keeping lock saves the peer


def test_past_its_cap_the_lock_drops_and_the_report_counts_what_fell_back() -> None:
    """keep=KeepCaps(packets_per_connection=1): of three segments the peer sends while its connection is locked,
    the first is kept and delivered; the other two are dropped, as by the plain lock, and counted in the report's
    `kept.fell_back` (with the peer's tail-loss probe of the third, when it came before the unlock). The peer
    resends them after its retransmission timeout, and every byte arrives in order."""
    parts = [b"first;", b"second;", b"third;"]
    with NetNS() as ns:
        with echo_connection(ns) as (server, client):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def network() -> None:
                for part in parts:  # one segment each: no Nagle, and gone before the next is written
                    client.send(part)
                    time.sleep(0.01)

            report = _move(server.pid, ns.name, network, sockrepair.KeepCaps(packets_per_connection=1))
            [restored] = report.handoff_result
            with restored:
                whole = b"".join(parts)
                assert recv_exactly(restored, len(whole)) == whole
                retransmitted = tcp_info(client)[2]
        # the second and third, and the peer's tail-loss probe when it fired before the unlock
        assert (report.kept.recording, report.kept.delivered) == (True, 1)
        assert 2 <= report.kept.fell_back <= 3
        assert retransmitted >= 1  # what the cap left to the peer


def test_a_request_sent_after_the_delivery_and_before_the_unlock_arrives_without_retransmission(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock stops and keeps what a peer sends until the unlock, also after the kept packets were delivered:
    migrate() delivers once more after the unlock, or the request waits for the peer's retransmission (the ~207 ms
    waits of bench_gap's requests workload at 100 connections)."""
    with NetNS() as ns:
        with echo_connection(ns) as (server, client):
            sent = request_before_the_unlock(monkeypatch, migrate_module, client, REQUEST)
            report = _move(server.pid, ns.name, lambda: None, keep=True)
            [restored] = report.handoff_result
            with restored:
                assert recv_exactly(restored, len(REQUEST)) == REQUEST
                retransmitted = tcp_info(client)[2]
        assert len(sent) == 1, "migrate() did not unlock its one connection through Locker.unlock"
        assert retransmitted == 0
        assert (report.kept.delivered, report.kept.fell_back) == (1, 0)


@pytest.mark.parametrize("listen", [SERVICE4, "::"], ids=["ipv4", "v4-mapped"])
def test_kept_at_host_a_delivered_at_host_b(listen: str) -> None:
    """The request reaches A's lock before the service address moves; it is delivered to the socket restored on B
    (an IPv4 connection, or one to a program listening on [::], whose socket has v4-mapped addresses)."""
    with Lab() as lab:
        with echo_connection(lab.a.ns, listen, SERVICE4, peer=lab.peer.ns, port=7007) as (server, client):

            def network() -> None:
                client.sendall(REQUEST)  # to A, where the connection is locked and the lock keeps it
                lab.move_service("a", "b")

            report = _move(server.pid, lab.b.name, network, keep=True)
            [restored] = report.handoff_result
            with restored:
                assert restored.family == (socket.AF_INET6 if listen == "::" else socket.AF_INET)
                assert recv_exactly(restored, len(REQUEST)) == REQUEST
                assert tcp_info(client)[2] == 0
                restored.sendall(b"200 OK")
                assert recv_exactly(client, 6) == b"200 OK"
        assert (report.kept.delivered, report.kept.fell_back) == (1, 0)


def test_kept_packets_travel_in_the_image_directory(tmp_path: Path) -> None:
    """What `dump` then `restore -D` do, step by step: the server's end is checkpointed and locked on A, the peer's
    request is kept there and written to packets.img; the address moves; the connection is restored on B from the
    image, the packets read from the file are delivered there, and the peer retransmits nothing."""
    with Lab() as lab:
        with lab.a.entered():
            listener = socket.create_server((SERVICE4, 7008))
        with lab.peer.entered():
            client = socket.create_connection((SERVICE4, 7008))
        server, _ = listener.accept()
        listener.close()
        with client, lab.a.entered(), Locker() as lock_a:
            keeper = Keeper(["/proc/thread-self/ns/net"])
            try:
                state = sockrepair.checkpoint(server)
                lock_a.lock([state], ttl=30, group=keeper.group_in("/proc/thread-self/ns/net"))
                sockrepair.discard(server, state)
                client.sendall(REQUEST)
                wait_for(lambda: keeper.pending([state.tuple]) == 1, "the request to reach A's lock", 5.0)
                dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    kept = keeper.write(dir_fd, [state.tuple])
                finally:
                    os.close(dir_fd)
            finally:
                keeper.close()
            assert (kept.delivered, kept.fell_back) == (1, 0)
            assert (tmp_path / "packets.img").stat().st_mode & 0o777 == 0o600
            image = state.to_bytes()
            lab.move_service("a", "b")
            with lab.b.entered():
                restored = sockrepair.restore(sockrepair.ConnectionState.from_bytes(image))
            with restored:
                assert send_kept(read_kept(tmp_path, [state.tuple]), netns_path(lab.b.name)) == 1
                lock_a.unlock([state])
                assert recv_exactly(restored, len(REQUEST)) == REQUEST
                assert tcp_info(client)[2] == 0
                restored.sendall(b"200 OK")
                assert recv_exactly(client, 6) == b"200 OK"



def test_a_second_mover_in_the_namespace_keeps_too() -> None:
    """Another mover records in the namespace (a dump's keeper waiting for its restore, another migrate()): this
    move's recorder binds a group of its own and its lock copies there, so the request is delivered without the
    peer retransmitting, and the other mover receives nothing of it. (With one group per namespace this move fell
    back to the dropping lock and the request came with the peer's retransmission.)"""
    with NetNS() as ns:
        with ns.entered():
            other_mover = Recorder()
        with other_mover, echo_connection(ns) as (server, client):
            report = _move(server.pid, ns.name, lambda: client.sendall(REQUEST), keep=True)
            [restored] = report.handoff_result
            with restored:
                assert recv_exactly(restored, len(REQUEST)) == REQUEST
                assert tcp_info(client)[2] == 0
            [conn] = [sockrepair.ConnTuple.parse(t) for t in report.connections]
            assert other_mover.pending([conn]) == 0 and other_mover.take([conn]).fell_back == 0
        assert (report.kept.recording, report.kept.delivered, report.kept.fell_back, report.kept.note) == (True, 1, 0,
                                                                                                         "")
