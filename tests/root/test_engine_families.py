"""IPv4, IPv6 and v4-mapped connections; options and socket options read back from the restored socket."""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest

import sockrepair
from sockrepair.engine._restore import _resync_changes_mss
from sockrepair.engine._session import _Session
from sockrepair.engine._sockopts import read_sockopts
from sockrepair.engine._tcpopts import read_options, tcp_info

FAMILIES = [
    pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4"),
    pytest.param(socket.AF_INET6, "::1", id="ipv6"),
    pytest.param(socket.AF_INET6, "::ffff:127.0.0.1", id="v4-mapped"),
]


def _move(sock: socket.socket) -> tuple[sockrepair.ConnectionState, socket.socket]:
    state = sockrepair.checkpoint(sock)
    sockrepair.discard(sock, state)
    return state, sockrepair.restore(state)


@pytest.mark.parametrize(("family", "addr"), FAMILIES)
def test_family_round_trip(make_pair, family, addr):
    client, server = make_pair(family, addr)
    client.sendall(b"request")
    server.sendall(b"partial reply")
    time.sleep(0.05)
    state, restored = _move(server)
    assert state.tuple.family == family
    assert state.tuple.local_addr == addr
    assert restored.family == family
    assert restored.getsockname()[:2] == server_addr(state)
    assert restored.getpeername()[:2] == (state.tuple.remote_addr, state.tuple.remote_port)
    assert restored.recv(100) == b"request"
    assert client.recv(100) == b"partial reply"
    restored.sendall(b"more")
    assert client.recv(100) == b"more"
    restored.close()


def server_addr(state: sockrepair.ConnectionState) -> tuple[str, int]:
    return (state.tuple.local_addr, state.tuple.local_port)


@pytest.mark.parametrize(("family", "addr"), FAMILIES)
def test_tcp_options_read_back(make_pair, family, addr):
    client, server = make_pair(family, addr)
    state, restored = _move(server)
    session = _Session(restored.fileno())
    got = read_options(session, tcp_info(session))
    assert (got.sack, got.timestamps, got.wscale) == (state.options.sack, state.options.timestamps,
                                                      state.options.wscale)
    assert (got.snd_wscale, got.rcv_wscale) == (state.options.snd_wscale, state.options.rcv_wscale)
    assert state.options.sack and state.options.timestamps and state.options.wscale
    # outside repair mode TCP_MAXSEG reports the current MSS, which the restored clamp bounds
    assert 0 < restored.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= state.options.mss
    again = sockrepair.checkpoint(restored)
    assert again.options == state.options
    assert again.window is not None and state.window is not None
    sockrepair.resume(restored)
    restored.close()


def test_timestamp_clock_continues(make_pair):
    client, server = make_pair()
    state, restored = _move(server)
    again = sockrepair.checkpoint(restored)
    sockrepair.resume(restored)
    # TCP timestamps tick in ms (or us with the flag bit): the restored clock starts where the old one was
    elapsed = (again.timestamp - state.timestamp) & 0xFFFFFFFF
    assert elapsed < 5_000_000, f"timestamp jumped by {elapsed}"
    restored.close()


@pytest.mark.parametrize(("family", "addr"), FAMILIES)
def test_socket_options_read_back(make_pair, family, addr):
    client, server = make_pair(family, addr)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 33)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 7)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 300_000)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 200_000)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 5)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x42)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x09\x00\x00\x00")
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 3)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 12_000)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 16_384)
    if family == socket.AF_INET:
        server.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x20)
        server.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 33)
    else:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0x20)
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 33)
    before = read_sockopts(_Session(server.fileno()), family)
    state, restored = _move(server)
    after = read_sockopts(_Session(restored.fileno()), family)
    assert state.sockopts == before
    assert after == before, _diff(before, after)
    assert before.congestion == "reno" and before.bindtodevice == "lo" and before.linger_secs == 9
    restored.sendall(b"still works")
    assert client.recv(100) == b"still works"
    restored.close()


def _diff(a: object, b: object) -> str:
    return ", ".join(
        f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
        for f in dataclasses.fields(a)  # type: ignore[arg-type]
        if getattr(a, f.name) != getattr(b, f.name)
    )


def test_cork_is_kept(make_pair):
    client, server = make_pair()
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    state, restored = _move(server)
    assert state.sockopts.cork
    assert restored.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1
    restored.close()


@pytest.mark.parametrize(("user_mss", "client_rcvbuf", "resync"), [(None, None, True), (1400, None, False),
                                                                  (None, 4096, True)],
                         ids=["loopback-mss", "small-mss", "small-window"])
def test_ipv4_restored_segment_size_is_the_originals(netns, user_mss, client_rcvbuf, resync):
    """The restored IPv4 socket sizes segments as the original did (TCP_MAXSEG outside repair mode: mss_cache):
    with loopback's MSS, above the user-MSS cap, the resync (IP_OPTIONS) sets it; with an MSS under the cap and
    a window whose half does not bound it, the repair-mode connect already did and the resync is skipped; with a
    small window, the resync bounds it to half of it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        if user_mss:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, user_mss)
        if client_rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    try:
        before = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        state, restored = _move(server)
        with restored:
            assert restored.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == before
        assert _resync_changes_mss(state) == resync
    finally:
        client.close()
        server.close()
