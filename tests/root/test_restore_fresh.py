"""A batch restore (sockrepair.move.land.restore_all) reads what a new socket of the namespace holds once
(engine/_sockopts.py fresh_values) and leaves alone the options whose saved value it holds already: every option of
every restored socket still reads back as the state says, whether the saved value is a new socket's default, one
the application set, or a default of the namespace's sysctls from before they changed (which must be set)."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator

import pytest

from sockrepair import discard
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine._batch import checkpoint_many, owed_acks, segs_out_of
from sockrepair.engine._ffi import lib
from sockrepair.engine._session import _Session
from sockrepair.engine._sockopts import (
    FRESH_WORTH,
    FreshValues,
    batch_fresh_values,
    fresh_values,
    read_sockopts,
)
from sockrepair.move import land
from sockrepair.move.land import restore_all
from tests.root.pairs import FAMILIES, loopback_pair, recv_exactly, wait_for

TCP = socket.IPPROTO_TCP
PMTUDISC_DO = 2  # IP_PMTUDISC_DO, IPV6_PMTUDISC_DO
# the namespace's sysctls while the last pair is made, away from the kernel's defaults (200 ms, 120 s, 0)
SYSCTLS = {"net/ipv4/tcp_rto_min_us": "100000", "net/ipv4/tcp_rto_max_ms": "60000", "net/ipv4/ip_no_pmtu_disc": "1"}


def _sysctl(key: str, value: str) -> None:
    # /proc/sys/net is the opener's namespace: the test's, entered by the netns fixture
    with open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


def _set_away_from_defaults(sock: socket.socket) -> None:
    """FRESH_COPIES set by the application, to values no new socket has here."""
    level, opt = ((socket.IPPROTO_IP, lib.IP_MTU_DISCOVER) if sock.family == socket.AF_INET
                  else (socket.IPPROTO_IPV6, lib.IPV6_MTU_DISCOVER))
    sock.setsockopt(level, opt, PMTUDISC_DO)
    for opt, value in ((lib.TCP_RTO_MIN_US, 60_000), (lib.TCP_RTO_MAX_MS, 30_000), (lib.TCP_DELACK_MAX_US, 100_000)):
        try:
            sock.setsockopt(TCP, opt, value)
        except OSError as exc:
            if exc.errno == errno.ENOPROTOOPT:
                pytest.skip("this kernel has no TCP_RTO_MIN_US / TCP_RTO_MAX_MS / TCP_DELACK_MAX_US (Linux 6.15+)")
            raise


@contextlib.contextmanager
def _closing(socks: list[socket.socket]) -> Iterator[None]:
    try:
        yield
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_a_batch_restore_sets_every_option_a_new_socket_does_not_hold(netns, monkeypatch, family, listen_addr,
                                                                      connect_addr):
    # a batch large enough to read the fresh values (FRESH_WORTH): half made before the sysctls change
    pairs = [loopback_pair(family, listen_addr, connect_addr) for _ in range(FRESH_WORTH // 2)]
    # restored without an owed ACK, it never takes SOCCR_MARK: its own mark must be the one it ends with
    pairs[0][1].setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x77)
    _set_away_from_defaults(pairs[1][1])
    # a new socket now holds other values than the first half did when they were made
    for key, value in SYSCTLS.items():
        _sysctl(key, value)
    pairs += [loopback_pair(family, listen_addr, connect_addr) for _ in range(FRESH_WORTH - len(pairs))]
    clients, servers = [c for c, _ in pairs], [s for _, s in pairs]
    restored: list[socket.socket] = []
    with _closing(clients), _closing(servers), _closing(restored):
        fresh = fresh_values((family,)).values[family]
        assert (fresh["rto_min_us"], fresh["rto_max_ms"]) == (100_000, 60_000)
        assert fresh["mtu_discover"] == (0 if family == socket.AF_INET else 1)  # DONT from the sysctl; v6 WANT
        for i, (client, server) in enumerate(pairs):
            client.sendall(b"unread %d" % i)
            server.sendall(b"to the client %d" % i)
            assert recv_exactly(client, len(b"to the client %d" % i)) == b"to the client %d" % i
        wait_for(lambda: all(tcpinfo.read(s, "tcpi_state")[0] == 1 for s in servers), "the pairs to settle")
        saved = [read_sockopts(_Session(s.fileno()), family) for s in servers]
        # all cases: the old defaults (differ from a new socket's), set values, the new defaults
        assert saved[0].rto_min_us == 200_000 and saved[1].rto_min_us == 60_000 and saved[-1].rto_min_us == 100_000
        sent = segs_out_of(servers)
        states = checkpoint_many(servers)
        owed = owed_acks(servers, states, sent)
        # each server's last segment acknowledged all it had received: none owes its peer an ACK
        assert owed == [False] * len(servers)
        assert states[0].sockopts.mark == 0x77
        for server, state in zip(servers, states):
            discard(server, state)
        used: list[FreshValues | None] = []

        def recorded(families: Iterable[int], count: int) -> FreshValues | None:
            used.append(batch_fresh_values(families, count))
            return used[-1]

        monkeypatch.setattr(land, "batch_fresh_values", recorded)
        restored.extend(restore_all(states, owed=owed))
        # the batch read the fresh values once, and its restores went by them (apply_in_repair's plans)
        assert len(used) == 1 and used[0] is not None and used[0].plans
        for i, (sock, state, before) in enumerate(zip(restored, states, saved)):
            assert state.sockopts == before
            assert read_sockopts(_Session(sock.fileno()), family) == before, i
            assert sock.recv(100) == b"unread %d" % i
            sock.sendall(b"after %d" % i)
            assert recv_exactly(clients[i], len(b"after %d" % i)) == b"after %d" % i


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_a_sysctl_changed_during_the_batch_does_not_reach_the_restored_sockets(netns, family, listen_addr,
                                                                               connect_addr):
    """The batch reads the fresh values before its first restore; a sysctl changed after the first socket is made
    gives the later ones the new value where the saved one was skipped: the batch finds the change at its end and
    sets those options again (fails without FreshValues.unchanged / set_fresh_copies)."""
    pairs = [loopback_pair(family, listen_addr, connect_addr) for _ in range(FRESH_WORTH)]
    clients, servers = [c for c, _ in pairs], [s for _, s in pairs]
    restored: list[socket.socket] = []
    with _closing(clients), _closing(servers), _closing(restored):
        saved = [read_sockopts(_Session(s.fileno()), family) for s in servers]
        if saved[0].rto_min_us == 0:
            pytest.skip("this kernel has no TCP_RTO_MIN_US (Linux 6.15+)")
        states = checkpoint_many(servers)
        for server, state in zip(servers, states):
            discard(server, state)

        def change_once(sock: socket.socket) -> None:
            if len(restored) == 0:
                restored.append(sock)
                for key, value in SYSCTLS.items():
                    _sysctl(key, value)

        got = restore_all(states, on_restored=change_once)
        restored[:] = got
        assert fresh_values((family,)).values[family]["rto_min_us"] == 100_000
        for i, (sock, before) in enumerate(zip(restored, saved)):
            assert read_sockopts(_Session(sock.fileno()), family) == before, i
            clients[i].sendall(b"request %d" % i)
            assert recv_exactly(sock, len(b"request %d" % i)) == b"request %d" % i
            sock.sendall(b"reply %d" % i)
            assert recv_exactly(clients[i], len(b"reply %d" % i)) == b"reply %d" % i
