"""Half-closed connections move: FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK and CLOSING, over IPv4, IPv6 and
v4-mapped; so do connections still in SYN_SENT. After the restore TCP_INFO shows the same state, the unread bytes and the peer's FIN reach the application
(recv returns the bytes, then b""), our own FIN reaches the peer after every byte we had queued, and no RST is sent
by anyone in the namespace."""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable, Iterator

import pytest

import sockrepair
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.state import ConnectionState
from tests.root.pairs import FAMILIES, tuple_of

FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING = 4, 5, 8, 9, 11
Pair = tuple[socket.socket, socket.socket]


def _state(sock: socket.socket) -> int:
    return tcpinfo.read(sock, "tcpi_state")[0]


def _out_rsts() -> int:
    """Tcp OutRsts of this network namespace (/proc/net/snmp): RSTs any socket here sent."""
    with open("/proc/thread-self/net/snmp") as f:
        head, values = [line.split() for line in f if line.startswith("Tcp:")]
    return int(values[head.index("OutRsts")])


def _pair(family: int, listen_addr: str, connect_addr: str, client_rcvbuf: int = 0) -> Pair:
    with socket.socket(family) as listener:
        listener.bind((listen_addr, 0))
        listener.listen()
        client = socket.socket(socket.AF_INET6 if ":" in connect_addr else socket.AF_INET)
        if client_rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        client.connect((connect_addr, listener.getsockname()[1]))
        server, _ = listener.accept()
    return client, server


def _fill(sock: socket.socket) -> bytes:
    """Write until the kernel takes no more (the peer reads nothing): the bytes written."""
    sock.setblocking(False)
    out = bytearray()
    chunk = bytes(range(256)) * 256
    try:
        while True:
            out += chunk[: sock.send(chunk)]
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return bytes(out)


def _until(sock: socket.socket, tcp_state: int) -> None:
    deadline = time.monotonic() + 10
    while _state(sock) != tcp_state:
        assert time.monotonic() < deadline, f"never reached state {tcp_state}"
        time.sleep(0.005)


# Each makes the server end reach its state: (client, server) -> (bytes the client sent the server and it did not
# read, bytes the server wrote for the client)
def _close_wait(c: socket.socket, s: socket.socket) -> tuple[bytes, bytes]:
    c.sendall(b"hello")
    c.shutdown(socket.SHUT_WR)
    return b"hello", b""


def _fin_wait2(c: socket.socket, s: socket.socket) -> tuple[bytes, bytes]:
    c.sendall(b"unread")
    s.shutdown(socket.SHUT_WR)
    return b"unread", b""


def _fin_wait1(c: socket.socket, s: socket.socket) -> tuple[bytes, bytes]:
    # the peer's window is full: our FIN waits behind bytes never sent
    written = _fill(s)
    s.shutdown(socket.SHUT_WR)
    return b"", written


def _last_ack(c: socket.socket, s: socket.socket) -> tuple[bytes, bytes]:
    c.sendall(b"bye")
    c.shutdown(socket.SHUT_WR)
    _until(s, CLOSE_WAIT)
    written = _fill(s)
    s.shutdown(socket.SHUT_WR)
    return b"bye", written


def _closing(c: socket.socket, s: socket.socket) -> tuple[bytes, bytes]:
    written = _fill(s)
    s.shutdown(socket.SHUT_WR)
    _until(s, FIN_WAIT1)
    c.shutdown(socket.SHUT_WR)
    return b"", written


SETUPS: dict[int, Callable[[socket.socket, socket.socket], tuple[bytes, bytes]]] = {
    CLOSE_WAIT: _close_wait, FIN_WAIT2: _fin_wait2, FIN_WAIT1: _fin_wait1, LAST_ACK: _last_ack, CLOSING: _closing,
}
NAMES = {FIN_WAIT1: "FIN_WAIT1", FIN_WAIT2: "FIN_WAIT2", CLOSE_WAIT: "CLOSE_WAIT", LAST_ACK: "LAST_ACK",
         CLOSING: "CLOSING"}


def _read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
@pytest.mark.parametrize("tcp_state", sorted(SETUPS), ids=[NAMES[s] for s in sorted(SETUPS)])
def test_a_half_closed_connection_moves(locker, tcp_state: int, family: int, listen_addr: str,
                                        connect_addr: str) -> None:
    client, server = _pair(family, listen_addr, connect_addr, client_rcvbuf=4096)
    restored = None
    try:
        unread, written = SETUPS[tcp_state](client, server)
        _until(server, tcp_state)
        rsts = _out_rsts()
        # a full peer window keeps the persist timer probing: without the lock, a probe's answer that arrives
        # while no socket holds the tuple is answered with RST
        locker.lock([tuple_of(server)], ttl=60)
        state = sockrepair.checkpoint(server)
        assert state.tcp_state == tcp_state
        assert state.recv_queue == unread
        sockrepair.discard(server, state)
        restored = sockrepair.restore(ConnectionState.from_bytes(state.to_bytes()))
        assert _state(restored) == tcp_state
        assert tuple_of(restored) == state.tuple
        locker.unlock([state.tuple])
        # every byte we had written reaches the peer, then our FIN
        if tcp_state != CLOSE_WAIT:
            assert _read_to_eof(client) == written
        # the unread bytes, then the peer's FIN
        if tcp_state in (CLOSE_WAIT, LAST_ACK, CLOSING):
            restored.settimeout(10)
            assert _read_to_eof(restored) == unread
        elif tcp_state == FIN_WAIT2:
            restored.settimeout(10)
            assert restored.recv(100) == unread
            client.sendall(b"more")
            assert restored.recv(100) == b"more"
            client.shutdown(socket.SHUT_WR)
            assert restored.recv(100) == b""
        if tcp_state == CLOSE_WAIT:
            restored.sendall(b"reply")
            client.settimeout(10)
            assert client.recv(100) == b"reply"
        assert _out_rsts() == rsts, "a RST went out"
    finally:
        client.close()
        server.close()
        if restored is not None:
            restored.close()


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_our_fin_sent_but_never_acknowledged_is_sent_again(locker, family: int, listen_addr: str,
                                                           connect_addr: str) -> None:
    """The lock drops the peer's ACK of our FIN: FIN_WAIT1 with the FIN in flight. Restored, the FIN goes out again
    once the lock is released and the peer acknowledges it."""
    client, server = _pair(family, listen_addr, connect_addr)
    try:
        server.sendall(b"last words")
        assert client.recv(100) == b"last words"
        conn = tuple_of(server)
        locker.lock([conn], ttl=60)
        server.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
        assert _state(server) == FIN_WAIT1
        state = sockrepair.checkpoint(server)
        assert (state.send_queue, state.unsent_len) == (b"", 0)
        sockrepair.discard(server, state)
        restored = sockrepair.restore(state)
        with restored:
            assert _state(restored) == FIN_WAIT1
            locker.unlock([conn])
            client.settimeout(10)
            assert client.recv(100) == b""  # the FIN, sent again
            _until(restored, FIN_WAIT2)
    finally:
        client.close()
        server.close()


SYN_SENT = 2
CONNECTING = [
    pytest.param(socket.AF_INET, "127.0.0.1", socket.AF_INET, "127.0.0.1", id="ipv4"),
    pytest.param(socket.AF_INET6, "::1", socket.AF_INET6, "::1", id="ipv6"),
    pytest.param(socket.AF_INET, "127.0.0.1", socket.AF_INET6, "::ffff:127.0.0.1", id="v4-mapped"),
]


@contextlib.contextmanager
def connecting(listen_family: int, listen_addr: str, family: int, connect_addr: str
               ) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A socket of `family` in SYN_SENT towards a listener on `listen_addr` whose accept queue is full (backlog 0,
    one connection waiting), which drops its SYN: yields (the listener, the connecting socket)."""
    with socket.socket(listen_family) as full:
        full.bind((listen_addr, 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection((listen_addr, port)), socket.socket(family) as stuck:
            stuck.setblocking(False)
            assert stuck.connect_ex((connect_addr, port)) == errno.EINPROGRESS
            _until(stuck, SYN_SENT)
            yield full, stuck


@pytest.mark.parametrize(("listen_family", "listen_addr", "family", "connect_addr"), CONNECTING)
def test_a_connection_still_connecting_moves(netns, listen_family: int, listen_addr: str, family: int,
                                             connect_addr: str) -> None:
    """SYN_SENT: the SYN goes to a listener whose accept queue is full (backlog 0, one waiting), which drops it.
    The restored socket sends it again from the same initial sequence number; once the queue has room the
    handshake completes and data flows."""
    with connecting(listen_family, listen_addr, family, connect_addr) as (full, stuck):
        port = full.getsockname()[1]
        rsts = _out_rsts()
        state = sockrepair.checkpoint(stuck)
        assert (state.tcp_state, state.tuple.remote_port, state.send_queue) == (SYN_SENT, port, b"")
        sockrepair.discard(stuck, state)
        with sockrepair.restore(ConnectionState.from_bytes(state.to_bytes())) as restored:
            assert _state(restored) == SYN_SENT
            full.accept()[0].close()  # room for one more: the next SYN is taken
            _until(restored, 1)
            assert tuple_of(restored) == state.tuple
            server, _ = full.accept()
            with server:
                restored.sendall(b"hello")
                server.settimeout(10)
                assert server.recv(10) == b"hello"
                server.sendall(b"there")
                restored.settimeout(10)
                assert restored.recv(10) == b"there"
        assert _out_rsts() == rsts
