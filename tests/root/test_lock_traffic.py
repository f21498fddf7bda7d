"""The lock on real traffic: a peer whose connection lost its socket gets RST without the lock and survives with it;
both directions are dropped, IPv4 and IPv6, and only the locked tuple is affected."""

from __future__ import annotations

import os
import socket

import pytest

import sockrepair
from sockrepair.lock import Locker
from sockrepair.netns import NetNS
from tests.root.pairs import (
    FAMILIES,
    assert_alive_and_silent,
    loopback_pair,
    recv_exactly,
    tcp_info,
    tuple_of,
    vanish,
    wait_for,
)

pytestmark = pytest.mark.root

PAYLOAD = os.urandom(48 * 1024)


def test_without_lock_the_peer_gets_rst(netns: NetNS) -> None:
    client, server = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with client:
        vanish(server)
        client.sendall(b"are you there?")
        client.settimeout(30)
        with pytest.raises(ConnectionResetError):
            client.recv(1)


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_with_lock_the_peer_survives(locker: Locker, family: int, listen_addr: str, connect_addr: str) -> None:
    client, server = loopback_pair(family, listen_addr, connect_addr)
    conn = tuple_of(server)
    with client:
        locker.lock([conn], ttl=30)
        vanish(server)
        client.sendall(b"are you there?")
        # the peer keeps trying (retransmissions: its packets leave it and are dropped at prerouting) and hears
        # nothing back, not even a RST
        wait_for(lambda: tcp_info(client)[1] + tcp_info(client)[2] >= 2, "two more send attempts by the peer")
        assert_alive_and_silent(client)
        locker.unlock([conn])


@pytest.mark.skipif(not hasattr(sockrepair, "restore"), reason="needs the repair engine")
@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_migrate_under_lock_delivers_every_byte(
    locker: Locker, family: int, listen_addr: str, connect_addr: str
) -> None:
    client, server = loopback_pair(family, listen_addr, connect_addr)
    with client:
        state = sockrepair.checkpoint(server)
        locker.lock([state], ttl=30)
        sockrepair.discard(server, state)
        client.sendall(PAYLOAD)
        wait_for(lambda: tcp_info(client)[1] + tcp_info(client)[2] >= 1, "the peer to retry while no socket exists")
        assert_alive_and_silent(client)
        with sockrepair.restore(state) as restored:
            locker.unlock([state])
            assert recv_exactly(restored, len(PAYLOAD)) == PAYLOAD
            restored.sendall(PAYLOAD[::-1])
            assert recv_exactly(client, len(PAYLOAD)) == PAYLOAD[::-1]




@pytest.mark.parametrize(
    ("family", "server_addr"), [(socket.AF_INET, "10.77.0.1"), (socket.AF_INET6, "fd77::1")], ids=["ipv4", "ipv6"]
)
def test_both_directions_dropped_only_for_the_locked_tuple(
    two_hosts: tuple[NetNS, NetNS], family: int, server_addr: str
) -> None:
    a, b = two_hosts
    with a.entered():
        listener = socket.socket(family)
        listener.bind((server_addr, 0))
        listener.listen()
        locker = Locker(label="pytest")
    with listener, locker:
        with b.entered():
            locked_cli = socket.create_connection((server_addr, listener.getsockname()[1]))
            other_cli = socket.create_connection((server_addr, listener.getsockname()[1]))
        locked_srv, _ = listener.accept()
        other_srv, _ = listener.accept()
        socks = (locked_cli, other_cli, locked_srv, other_srv)
        try:
            conn = tuple_of(locked_srv)
            locker.lock([conn], ttl=30)
            assert [r.tuple for r in locker.list_locks()] == [conn]

            locked_cli.sendall(b"to server")  # dropped on a's input hook
            locked_srv.sendall(b"to client")  # dropped on a's output hook
            other_cli.sendall(b"ping")
            other_srv.sendall(b"pong")
            assert recv_exactly(other_srv, 4) == b"ping"
            assert recv_exactly(other_cli, 4) == b"pong"
            # the client's packets cross the veth and are retransmitted; the server's die in its own output hook,
            # which TCP sees as a failed send and retries as probes
            wait_for(lambda: tcp_info(locked_cli)[2] >= 2, "client retransmissions")
            wait_for(lambda: tcp_info(locked_srv)[1] >= 2, "server send retries")
            assert_alive_and_silent(locked_srv)
            assert_alive_and_silent(locked_cli)
            assert tcp_info(other_cli)[2] == 0 and tcp_info(other_srv)[2] == 0

            locker.unlock([conn])
            assert recv_exactly(locked_srv, 9) == b"to server"
            assert recv_exactly(locked_cli, 9) == b"to client"
            assert locker.list_locks() == []
        finally:
            for s in socks:
                s.close()
            locker.unlock_all()
            assert locker.rule_count() == 0
