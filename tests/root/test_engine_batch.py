"""checkpoint_many (engine/_batch.py) gives, field by field, the states checkpoint() gives for the same sockets, over
IPv4, IPv6 and v4-mapped, in several TCP states, with queues and non-default options, across two namespaces; it
raises what checkpoint() raises for a socket that cannot be moved, and leaves every socket as it found it."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Callable

import pytest

import sockrepair
from sockrepair.engine import _batch
from sockrepair.engine._batch import checkpoint_many, ensure_all_unchanged
from sockrepair.engine._session import _Session
from sockrepair.engine._sockopts import read_sockopts
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState
from tests.root.pairs import FAMILIES, recv_exactly, wait_for
from tests.root.test_engine_closed import _peer_of_closed
from tests.root.test_engine_registry import _attach_filter
from tests.root.test_engine_states import (
    CLOSE_WAIT,
    CONNECTING,
    FIN_WAIT2,
    SETUPS,
    _pair,
    _until,
    connecting,
)

SOL, TCP, IP = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP
ESTABLISHED, SYN_SENT, CLOSE = 1, 2, 7
TCP_REPAIR = 19
SO_MAX_PACING_RATE = 47


@pytest.fixture(autouse=True, params=["dump", "one by one"])
def reading(request, monkeypatch) -> str:
    """Every test runs both ways a batch reads its sockets: through one sock_diag dump (a batch at least
    dump_pays_from() long), and one by one as checkpoint() does (a shorter batch)."""
    monkeypatch.setattr(_batch, "dump_pays_from", lambda: 1 if request.param == "dump" else 1 << 30)
    return str(request.param)


def _established(c: socket.socket, s: socket.socket) -> tuple[bytes, bytes]:
    """Bytes both ways, and options a dump shows (TOS, mark, buffers, the device) set away from their defaults."""
    level, tos = (IP, socket.IP_TOS) if s.family == socket.AF_INET else (socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
    s.setsockopt(level, tos, 0x28)
    s.setsockopt(SOL, socket.SO_MARK, 0x1234)
    s.setsockopt(SOL, socket.SO_SNDBUF, 96 << 10)
    s.setsockopt(SOL, socket.SO_RCVBUF, 80 << 10)
    s.setsockopt(SOL, socket.SO_BINDTODEVICE, b"lo")
    s.setsockopt(TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(SOL, socket.SO_PRIORITY, 5)
    s.setsockopt(SOL, SO_MAX_PACING_RATE, 1_000_000)
    c.sendall(b"to the server, unread")
    s.sendall(b"to the client")
    wait_for(lambda: _inq(s) == 21, "the bytes to arrive")
    return b"", b""


def _inq(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0])


def _comparable(state: ConnectionState) -> ConnectionState:
    # the timestamp clock ticks between the two checkpoints: only its microsecond flag (bit 0) must agree
    return dataclasses.replace(state, timestamp=state.timestamp & 1)


def _in_repair(sock: socket.socket) -> int:
    return sock.getsockopt(TCP, TCP_REPAIR)


def _made(family: int, listen_addr: str, connect_addr: str, setup: str) -> tuple[socket.socket, socket.socket]:
    c, s = _pair(family, listen_addr, connect_addr)
    if setup == "established":
        _established(c, s)
    else:
        tcp_state = {"close_wait": CLOSE_WAIT, "fin_wait2": FIN_WAIT2}[setup]
        SETUPS[tcp_state](c, s)
        _until(s, tcp_state)
    return c, s


SETUP_NAMES = ("established", "close_wait", "fin_wait2")


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_batch_and_single_checkpoints_are_equal(netns, family: int, listen_addr: str, connect_addr: str) -> None:
    pairs = [_made(family, listen_addr, connect_addr, setup) for setup in SETUP_NAMES for _ in range(2)]
    socks = [s for _, s in pairs]
    try:
        # what getsockopt reads of every option: both checkpoints take some from sock_diag instead
        plain = [read_sockopts(_Session(s.fileno()), family) for s in socks]
        single = [sockrepair.checkpoint(s) for s in socks]
        for s in socks:
            sockrepair.resume(s)
        batch = checkpoint_many(socks)
        assert [_in_repair(s) for s in socks] == [1] * len(socks)
        for s in socks:
            sockrepair.resume(s)
        assert [st.tcp_state for st in batch] == [ESTABLISHED] * 2 + [CLOSE_WAIT] * 2 + [FIN_WAIT2] * 2
        for one, many in zip(single, batch):
            for field in dataclasses.fields(ConnectionState):
                assert getattr(_comparable(many), field.name) == getattr(_comparable(one), field.name), field.name
        assert [st.sockopts for st in batch] == plain
        first = batch[0]
        assert first.recv_queue == b"to the server, unread"
        assert (first.sockopts.tos, first.sockopts.mark, first.sockopts.bindtodevice) == (0x28, 0x1234, "lo")
        assert (first.sockopts.priority, first.sockopts.max_pacing_rate) == (5, 1_000_000)
        assert (batch[2].sockopts.priority, batch[2].sockopts.max_pacing_rate) == (0, -1)
        assert first.sockopts.nodelay
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


@pytest.mark.parametrize(("listen_family", "listen_addr", "family", "connect_addr"), CONNECTING)
def test_batch_and_single_checkpoints_of_a_connecting_socket_are_equal(netns, listen_family: int, listen_addr: str,
                                                                       family: int, connect_addr: str) -> None:
    """SYN_SENT, whose 4-tuple getpeername cannot give: the batch takes it from its dump, checkpoint() from one of
    its own (the SYN goes to a listener whose accept queue is full, which drops it)."""
    with connecting(listen_family, listen_addr, family, connect_addr) as (full, stuck):
        port = full.getsockname()[1]
        one = sockrepair.checkpoint(stuck)
        sockrepair.resume(stuck)
        (many,) = checkpoint_many([stuck])
        sockrepair.resume(stuck)
        assert _comparable(many) == _comparable(one)
        assert (many.tcp_state, many.tuple.remote_port) == (SYN_SENT, port)


def test_batch_across_two_namespaces(netns) -> None:
    """Sockets of another namespace in the same batch: that namespace is dumped too."""
    here = [_made(socket.AF_INET, "127.0.0.1", "127.0.0.1", "established") for _ in range(2)]
    with NetNS() as other:
        with other.entered():
            there = [_made(socket.AF_INET6, "::1", "::1", "established") for _ in range(2)]
        pairs = [here[0], there[0], here[1], there[1]]
        socks = [s for _, s in pairs]
        try:
            single = []
            for s in socks:
                single.append(sockrepair.checkpoint(s))
                sockrepair.resume(s)
            batch = checkpoint_many(socks)
            for s in socks:
                sockrepair.resume(s)
            assert [_comparable(b) for b in batch] == [_comparable(s) for s in single]
            assert [b.tuple.family for b in batch] == [socket.AF_INET, socket.AF_INET6] * 2
        finally:
            for pair in pairs:
                for sock in pair:
                    sock.close()


def _urgent_read(c: socket.socket, s: socket.socket) -> None:
    c.send(b"abc")
    c.send(b"X", socket.MSG_OOB)
    wait_for(lambda: _inq(s) == 3, "the bytes before the mark")
    assert s.recv(1, socket.MSG_OOB) == b"X"


TIMESTAMPS = "SO_TIMESTAMP/SO_TIMESTAMPNS/SO_TIMESTAMPING"
RX_SOFTWARE = 0x08 | 0x10  # SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE
REFUSALS: dict[str, tuple[str, Callable[[socket.socket, socket.socket], None]]] = {
    # shown by the dump
    "IP_RECVERR": ("IP_RECVERR/IPV6_RECVERR", lambda c, s: s.setsockopt(IP, 11, 1)),
    "SHUT_RD": ("shutdown(SHUT_RD)", lambda c, s: s.shutdown(socket.SHUT_RD)),
    "urgent": ("urgent data (MSG_OOB)", _urgent_read),
    # asked per socket
    "SO_DONTROUTE": ("SO_DONTROUTE", lambda c, s: s.setsockopt(SOL, socket.SO_DONTROUTE, 1)),
    # asked only when the dump's sk_omem_alloc (SKMEMINFO) is not 0, which a filter charges
    "SO_ATTACH_FILTER": ("SO_ATTACH_FILTER/SO_ATTACH_BPF", lambda c, s: _attach_filter(s)),
    "IP_OPTIONS": ("IP_OPTIONS/IPV6_HOPOPTS/IPV6_RTHDR/IPV6_DSTOPTS/IPV6_RTHDRDSTOPTS",
                   lambda c, s: s.setsockopt(IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00")),
    "IP_MINTTL": ("IP_MINTTL/IPV6_MINHOPCOUNT", lambda c, s: s.setsockopt(IP, 21, 5)),
    # each way to ask for receive timestamps (asm-generic/socket.h), fewer calls suspect them all
    "SO_TIMESTAMP_OLD": (TIMESTAMPS, lambda c, s: s.setsockopt(SOL, 29, 1)),
    "SO_TIMESTAMPNS_OLD": (TIMESTAMPS, lambda c, s: s.setsockopt(SOL, 35, 1)),
    "SO_TIMESTAMPING_OLD": (TIMESTAMPS, lambda c, s: s.setsockopt(SOL, 37, RX_SOFTWARE)),
    "SO_TIMESTAMP_NEW": (TIMESTAMPS, lambda c, s: s.setsockopt(SOL, 63, 1)),
    "SO_TIMESTAMPNS_NEW": (TIMESTAMPS, lambda c, s: s.setsockopt(SOL, 64, 1)),
    "SO_TIMESTAMPING_NEW": (TIMESTAMPS, lambda c, s: s.setsockopt(SOL, 65, RX_SOFTWARE)),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_batch_refuses_as_checkpoint_does_and_resumes_all(make_pair, case: str) -> None:
    entry, setup = REFUSALS[case]
    pairs = [make_pair() for _ in range(3)]
    client, server = pairs[1]
    setup(client, server)
    with pytest.raises(sockrepair.SocketStateError) as alone:
        sockrepair.checkpoint(server)
    socks = [s for _, s in pairs]
    with pytest.raises(sockrepair.SocketStateError) as together:
        checkpoint_many(socks)
    assert f"({entry})" in str(together.value)
    assert str(together.value) == str(alone.value)
    assert (together.value.fd, together.value.tuple) == (server.fileno(), alone.value.tuple)
    # every socket, the two before and after it included, is out of repair mode and still sends at once
    assert [_in_repair(s) for s in socks] == [0, 0, 0]
    for c, s in (pairs[0], pairs[2]):
        s.sendall(b"still here")
        assert recv_exactly(c, 10) == b"still here"


def test_batch_refuses_ipv6_extension_headers_as_checkpoint_does(make_pair) -> None:
    """IPV6_HOPOPTS (a hop-by-hop header of one PadN option) is charged to sk_omem_alloc (ipv6_renew_options:
    sock_kmalloc), which makes both checkpoints ask for the IPv6 headers."""
    pairs = [make_pair(socket.AF_INET6, "::1") for _ in range(2)]
    client, server = pairs[1]
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, b"\x00\x00\x01\x04\x00\x00\x00\x00")
    with pytest.raises(sockrepair.SocketStateError) as alone:
        sockrepair.checkpoint(server)
    with pytest.raises(sockrepair.SocketStateError) as together:
        checkpoint_many([s for _, s in pairs])
    assert "IPV6_HOPOPTS holds 8 bytes (IP_OPTIONS/IPV6_HOPOPTS/" in str(together.value)
    assert str(together.value) == str(alone.value)
    assert [_in_repair(s) for _, s in pairs] == [0, 0]


def test_batch_refuses_a_listening_socket_as_checkpoint_does(make_pair) -> None:
    client, server = make_pair()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with pytest.raises(sockrepair.SocketStateError) as alone:
            sockrepair.checkpoint(listener)
        with pytest.raises(sockrepair.SocketStateError) as together:
            checkpoint_many([server, listener])
        assert str(together.value) == str(alone.value)
        assert together.value.tcp_state == 10
    assert _in_repair(server) == 0
    server.sendall(b"still here")
    assert recv_exactly(client, 10) == b"still here"


@pytest.mark.parametrize("what", ["pipe", "closed", "negative"])
def test_batch_of_fds_refuses_a_non_socket_as_checkpoint_does_and_keeps_it_open(make_pair, what: str) -> None:
    """An fd is read through a socket object made over it and detached after: never closed, whatever it is."""
    client, server = make_pair()
    r, w = os.pipe()
    try:
        bad = {"pipe": r, "closed": w, "negative": -1}[what]
        if what == "closed":
            os.close(w)
        with pytest.raises(sockrepair.SocketStateError) as alone:
            sockrepair.checkpoint(bad)
        with pytest.raises(sockrepair.SocketStateError) as together:
            checkpoint_many([server.fileno(), bad])
        assert str(together.value) == str(alone.value)
        os.fstat(r)  # still open
        assert _in_repair(server) == 0
        server.sendall(b"still here")
        assert recv_exactly(client, 10) == b"still here"
    finally:
        os.close(r)
        if what != "closed":
            os.close(w)


def test_all_unchanged_names_the_socket_that_received_while_frozen(make_pair) -> None:
    pairs = [make_pair() for _ in range(3)]
    socks = [s for _, s in pairs]
    states = checkpoint_many(socks)
    try:
        ensure_all_unchanged([s.fileno() for s in socks], states)
        pairs[2][0].sendall(b"late")  # no lock: the frozen socket still takes it in
        wait_for(lambda: _inq(socks[2]) == 4, "the bytes to arrive")
        with pytest.raises(sockrepair.SocketStateError, match=r"\(0, 0, 0\) -> \(0, 0, 4\)") as caught:
            ensure_all_unchanged(socks, states)
        assert (caught.value.fd, caught.value.tuple) == (socks[2].fileno(), states[2].tuple)
    finally:
        for s in socks:
            sockrepair.resume(s)


def _reset_with_unread(family: int, listen_addr: str, connect_addr: str) -> socket.socket:
    """A server socket in CLOSE: its peer reset the connection, leaving unread bytes and ECONNRESET pending."""
    client, server = _pair(family, listen_addr, connect_addr)
    with client:
        client.sendall(b"unread before the reset")
        wait_for(lambda: _inq(server) == 23, "the bytes to arrive")
        client.setsockopt(SOL, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _until(server, CLOSE)
    return server


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_batch_reads_a_closed_connection_as_checkpoint_does(netns, family: int, listen_addr: str,
                                                            connect_addr: str) -> None:
    """No dump lists a socket in CLOSE: the batch reads it as checkpoint() does (SO_PEERNAME, the pending error),
    among sockets it reads from its dump. Reading the error clears it, so the single checkpoint reads one socket and
    the batch the same case made again: they agree but for what the two connections' own numbers make differ."""
    c, s = _made(family, listen_addr, connect_addr, "established")
    alone, batched = (_reset_with_unread(family, listen_addr, connect_addr) for _ in range(2))
    try:
        one_open = sockrepair.checkpoint(s)
        sockrepair.resume(s)
        one = sockrepair.checkpoint(alone)
        many_open, many = checkpoint_many([s, batched])
        assert [_in_repair(x) for x in (s, batched)] == [1, 1]
        for x in (s, alone, batched):
            sockrepair.resume(x)
        assert _comparable(many_open) == _comparable(one_open)
        assert (many.tcp_state, many.sk_err, many.fin_received) == (CLOSE, errno.ECONNRESET, False)
        assert many.recv_queue == b"unread before the reset" and (many.send_queue, many.unsent_len) == (b"", 0)
        assert many.tuple == _peer_of_closed(batched)
        for field in ("tcp_state", "sk_err", "fin_received", "recv_queue", "send_queue", "unsent_len", "options",
                      "sockopts"):
            assert getattr(many, field) == getattr(one, field), field
    finally:
        for sock in (c, s, alone, batched):
            sock.close()


def test_a_failing_batch_leaves_a_closed_connection_s_error_unread(make_pair) -> None:
    """The socket in CLOSE is read after every other: a batch refused for another socket never reads (and so never
    clears) its pending error."""
    closed = _reset_with_unread(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    client, server = make_pair()
    server.setsockopt(SOL, socket.SO_DONTROUTE, 1)
    with closed:
        with pytest.raises(sockrepair.SocketStateError, match=r"\(SO_DONTROUTE\)") as err:
            checkpoint_many([closed, server])
        assert err.value.fd == server.fileno()
        assert [_in_repair(x) for x in (closed, server)] == [0, 0]
        assert closed.getsockopt(SOL, socket.SO_ERROR) == errno.ECONNRESET
        assert closed.recv(100) == b"unread before the reset"
