"""Connections in CLOSE move: a socket whose connection was reset, or whose close ended (LAST_ACK acknowledged, or
TIME_WAIT reached), while the application still holds it. Over IPv4, IPv6 and v4-mapped, each case is made twice:
one socket is the reference, read as the application would read it; the other is checkpointed, discarded and
restored from its image, then read the same way, and both must answer alike: the unread bytes, then b"" or the
pending error, send's error, poll's events and SO_ERROR. Nothing goes on the wire (Tcp OutSegs and OutRsts of the
namespace do not move) though the connection is locked: the re-created segments carry the mark the lock lets
through. An error that no reset gives (here ETIMEDOUT) and a CLOSE socket without a peer are refused."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

import sockrepair
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.image.directory import read_dir
from sockrepair.lab.recorder import Recorder
from sockrepair.lock import Locker
from sockrepair.move.dump import After, dump, inspect
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import ProcSocket, closed_connections, tcp_sockets
from sockrepair.state import ConnectionState, ConnTuple
from tests.clihelp import run_main
from tests.root.pairs import FAMILIES, loopback_pair, tuple_of

CLOSE, CLOSE_WAIT, LAST_ACK, FIN_WAIT2 = 7, 8, 9, 5
SO_PEERNAME = 28
TCP_REPAIR = 19
UNREAD = b"unread bytes " * 300  # more than a segment's worth of MSS: the refill spans several


def _state(sock: socket.socket) -> int:
    return tcpinfo.read(sock, "tcpi_state")[0]


def _until(sock: socket.socket, tcp_state: int) -> None:
    deadline = time.monotonic() + 10
    while _state(sock) != tcp_state:
        assert time.monotonic() < deadline, f"never reached state {tcp_state} (now {_state(sock)})"
        time.sleep(0.002)


def _tcp_counters() -> tuple[int, int]:
    """Tcp OutSegs and OutRsts of this network namespace (/proc/net/snmp): what any socket here sent."""
    with open("/proc/thread-self/net/snmp") as f:
        head, values = [line.split() for line in f if line.startswith("Tcp:")]
    return int(values[head.index("OutSegs")]), int(values[head.index("OutRsts")])


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _peer_of_closed(sock: socket.socket) -> ConnTuple:
    """getsockname and SO_PEERNAME (getpeername says ENOTCONN in CLOSE)."""
    local = sock.getsockname()
    size = 16 if sock.family == socket.AF_INET else 28
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERNAME, size)
    port = struct.unpack_from(">H", raw, 2)[0]
    addr = socket.inet_ntop(sock.family, raw[4:8] if sock.family == socket.AF_INET else raw[8:24])
    return ConnTuple(sock.family, local[0], local[1], addr, port)


def _peer_closed(c: socket.socket, s: socket.socket) -> None:
    """The client sends UNREAD and its FIN: the server end in CLOSE_WAIT."""
    c.sendall(UNREAD)
    c.shutdown(socket.SHUT_WR)
    _until(s, CLOSE_WAIT)


# Each leaves the server end in CLOSE: (client, server, locker) -> (error, FIN received) checkpoint must read.
def _reset_established(c: socket.socket, s: socket.socket, lk: Locker) -> tuple[int, bool]:
    c.sendall(UNREAD)
    time.sleep(0.02)
    _reset(c)
    return errno.ECONNRESET, False


def _reset_error_read(c: socket.socket, s: socket.socket, lk: Locker) -> tuple[int, bool]:
    _reset_established(c, s, lk)
    _until(s, CLOSE)
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET  # the application saw it
    return 0, False


def _reset_in_close_wait(c: socket.socket, s: socket.socket, lk: Locker) -> tuple[int, bool]:
    _peer_closed(c, s)
    _reset(c)
    return errno.EPIPE, True


def _reset_in_last_ack(c: socket.socket, s: socket.socket, lk: Locker) -> tuple[int, bool]:
    """Our FIN is held by the lock, so the peer's RST finds LAST_ACK: ECONNRESET after the peer's FIN."""
    _peer_closed(c, s)
    conn = tuple_of(s)
    lk.lock([conn], ttl=60)
    try:
        s.shutdown(socket.SHUT_WR)
        _until(s, LAST_ACK)
    finally:
        lk.unlock([conn])
    _reset(c)
    return errno.ECONNRESET, True


def _last_ack_acknowledged(c: socket.socket, s: socket.socket, lk: Locker) -> tuple[int, bool]:
    _peer_closed(c, s)
    s.shutdown(socket.SHUT_WR)
    return 0, False


def _time_wait(c: socket.socket, s: socket.socket, lk: Locker) -> tuple[int, bool]:
    """We closed first: after the peer's FIN the connection is in TIME_WAIT, the socket itself in CLOSE."""
    s.shutdown(socket.SHUT_WR)
    _until(s, FIN_WAIT2)
    c.sendall(UNREAD)
    c.close()
    return 0, False


CASES: dict[str, Callable[[socket.socket, socket.socket, Locker], tuple[int, bool]]] = {
    "reset": _reset_established, "reset-error-read": _reset_error_read, "reset-in-close-wait": _reset_in_close_wait,
    "reset-in-last-ack": _reset_in_last_ack, "last-ack-acknowledged": _last_ack_acknowledged,
    "time-wait": _time_wait,
}


def _read_as_the_application(sock: socket.socket) -> list[object]:
    """poll's events, then recv until two b"" in a row (each error named), then send's error, then SO_ERROR."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLOUT | select.POLLERR | select.POLLHUP | select.POLLRDHUP)
    seen: list[object] = [poller.poll(0)[0][1]]
    empty = 0
    while empty < 2:
        try:
            chunk = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except OSError as exc:
            seen.append(errno.errorcode[exc.errno])
            continue
        seen.append(chunk)
        empty = empty + 1 if chunk == b"" else 0
    try:
        sock.send(b"x", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        seen.append("sent")
    except OSError as exc:
        seen.append("send " + errno.errorcode[exc.errno])
    seen.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    return seen


def _closed(case: str, family: int, listen_addr: str, connect_addr: str, lk: Locker) -> tuple[socket.socket, int,
                                                                                                 bool]:
    client, server = loopback_pair(family, listen_addr, connect_addr)
    try:
        want = CASES[case](client, server, lk)
        _until(server, CLOSE)
    finally:
        client.close()
    return server, *want


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_closed_connection_moves(netns, locker, case: str, family: int, listen_addr: str,
                                   connect_addr: str) -> None:
    reference, sk_err, fin = _closed(case, family, listen_addr, connect_addr, locker)
    with reference:
        expected = _read_as_the_application(reference)
    server, _, _ = _closed(case, family, listen_addr, connect_addr, locker)
    restored = None
    conn = _peer_of_closed(server)
    locker.lock([conn], ttl=60)
    locked = True
    recorder: Recorder | None = Recorder("lo", netns.name).start()
    try:
        segs, rsts = _tcp_counters()
        state = sockrepair.checkpoint(server)
        assert (state.tcp_state, state.tuple, state.recv_queue) == (CLOSE, conn, UNREAD)
        assert (state.sk_err, state.fin_received, state.send_queue, state.unsent_len) == (sk_err, fin, b"", 0)
        sockrepair.discard(server, state)
        restored = sockrepair.restore(ConnectionState.from_bytes(state.to_bytes()))
        locker.unlock([conn])
        locked = False
        assert _state(restored) == CLOSE
        assert _peer_of_closed(restored) == conn
        assert restored.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR) == 0
        got = _read_as_the_application(restored)
        assert got == expected
        # the bytes, then what the application sees of the close
        assert got[1] == UNREAD
        assert got[2] == (errno.errorcode[sk_err] if sk_err and not fin else b"")
        assert got[-2] == "send " + errno.errorcode[sk_err if sk_err and fin else errno.EPIPE]
        time.sleep(0.05)
        assert recorder is not None
        recorder.stop()
        segments, recorder = recorder.segments(), None
        # loopback shows each packet twice (sent, then received)
        ours = list(dict.fromkeys((g.src_port, g.flag_text, g.seq) for g in segments
                                  if {g.src_port, g.dst_port} == {conn.local_port, conn.remote_port}))
        # on the wire only the re-created segments, from the peer's side: the RST, after the FIN when it matters
        assert [(port, flags) for port, flags, _ in ours] == [(conn.remote_port, "FA")] * (fin and bool(sk_err)) + [
            (conn.remote_port, "RA")], ours
        sent_segs, sent_rsts = _tcp_counters()
        assert sent_rsts == rsts, "a RST was sent"
        # Nothing was sent, but where the FIN is re-created: its delayed ACK, armed for the next tick, is cancelled
        # by the RST sent right after it, unless a tick falls in between; the lock then drops it (not seen above).
        assert sent_segs - segs <= (1 if fin and sk_err else 0), "a segment was sent"
    finally:
        if recorder is not None:
            recorder.stop()
        if locked:
            locker.unlock([conn])
        server.close()
        if restored is not None:
            restored.close()


def test_an_error_no_reset_gives_is_refused(locker) -> None:
    """ETIMEDOUT (the peer stopped answering; TCP_USER_TIMEOUT ran out): restore could not re-create it, so the
    checkpoint refuses the connection and leaves the socket out of repair mode."""
    client, server = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with client, server:
        client.sendall(b"unread")
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 100)
        conn = tuple_of(server)
        locker.lock([conn], ttl=60)
        try:
            server.send(b"never acknowledged")
            _until(server, CLOSE)
        finally:
            locker.unlock([conn])
        with pytest.raises(sockrepair.SocketStateError, match="holds the error ETIMEDOUT") as err:
            sockrepair.checkpoint(server)
        assert (err.value.fd, err.value.tcp_state, err.value.tuple) == (server.fileno(), CLOSE, _peer_of_closed(server))
        assert server.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR) == 0
        assert server.recv(100) == b"unread"


@pytest.mark.parametrize(("read_oob", "what"), [(False, "an urgent byte not yet read, in CLOSE"),
                                                 (True, "holds bytes past its 3 unread ones (an urgent mark")])
def test_urgent_data_in_a_closed_connection_is_refused_and_left_as_it_was(netns, read_oob: bool,
                                                                            what: str) -> None:
    """`abc`, `X` with MSG_OOB, `def`, then the peer's RST: with the urgent byte unread, or read (its mark still
    ahead of the reader), the checkpoint refuses before reading the error, which stays pending."""
    client, server = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with server:
        client.send(b"abc")
        client.send(b"X", socket.MSG_OOB)
        client.sendall(b"def")
        time.sleep(0.02)
        if read_oob:
            assert server.recv(1, socket.MSG_OOB) == b"X"
        _reset(client)
        _until(server, CLOSE)
        with pytest.raises(sockrepair.SocketStateError, match=re.escape(what)) as err:
            sockrepair.checkpoint(server)
        assert (err.value.fd, err.value.tcp_state) == (server.fileno(), CLOSE)
        assert server.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR) == 0
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        assert server.recv(100) == b"abc"


def _disconnected() -> socket.socket:
    client, server = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    client.close()
    libc = ctypes.CDLL(None, use_errno=True)
    unspec = ctypes.create_string_buffer(16)  # struct sockaddr with sa_family AF_UNSPEC: tcp_disconnect
    assert libc.connect(server.fileno(), unspec, 16) == 0, os.strerror(ctypes.get_errno())
    return server


@pytest.mark.parametrize("make", [lambda: socket.socket(), _disconnected], ids=["never-connected", "disconnected"])
def test_a_closed_socket_without_a_peer_is_refused(netns, make: Callable[[], socket.socket]) -> None:
    """Never connected, or disconnected with connect(AF_UNSPEC): CLOSE with no connection to move."""
    with make() as sock:
        assert _state(sock) == CLOSE
        with pytest.raises(sockrepair.SocketStateError, match="in state CLOSE without a peer") as err:
            sockrepair.checkpoint(sock)
        assert (err.value.fd, err.value.tcp_state, err.value.tuple) == (sock.fileno(), CLOSE, None)


# Accepts two connections, reads nothing, and sleeps: what it holds stays as the peers left it.
HOLDER = r"""
import socket, time
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen()
print(lst.getsockname()[1], flush=True)
held = [lst.accept()[0] for _ in range(2)]
print("accepted", flush=True)
time.sleep(600)
"""
# What the restored program reports: for the CLOSE connection, three recv()s then a send(); for the live one, the
# 4 bytes it receives, answered with "pong".
RESTORED = r"""
import errno, json, os, socket
report = {}
for n in range(int(os.environ["LISTEN_FDS"])):
    s = socket.socket(fileno=3 + n)
    if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 7:
        seen = []
        for _ in range(3):
            try:
                seen.append(s.recv(100, socket.MSG_DONTWAIT).decode())
            except OSError as exc:
                seen.append(errno.errorcode[exc.errno])
        try:
            s.send(b"x", socket.MSG_NOSIGNAL)
        except OSError as exc:
            seen.append(errno.errorcode[exc.errno])
        report["closed"] = seen
    else:
        s.settimeout(10)
        report["live"] = s.recv(4).decode()
        s.sendall(b"pong")
print(json.dumps(report), flush=True)
"""


@contextlib.contextmanager
def _holder_with_a_reset() -> Iterator[tuple[subprocess.Popen[str], socket.socket, int, ProcSocket]]:
    """The HOLDER program with two connections of this process: one ESTABLISHED, the other reset by this end after
    sending b"hello". Yields (the program, the live client socket, the reset one's client port, the program's
    socket of it, in CLOSE); kills the program afterwards."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    port = int(holder.stdout.readline())
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    gone = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert holder.stdout.readline().strip() == "accepted"
        gone_port = gone.getsockname()[1]
        gone.sendall(b"hello")
        time.sleep(0.02)
        _reset(gone)
        deadline = time.monotonic() + 10
        while not any(s.tcp_state == CLOSE for s in tcp_sockets(holder.pid)):
            assert time.monotonic() < deadline, "the reset connection never reached CLOSE"
            time.sleep(0.005)
        (closed,) = [s for s in tcp_sockets(holder.pid) if s.tcp_state == CLOSE]
        yield holder, live, gone_port, closed
    finally:
        live.close()
        gone.close()
        holder.kill()
        holder.wait()


def test_a_process_with_a_reset_connection_is_dumped_and_restored_whole(netns, tmp_path) -> None:
    """`sockrepair dump --pid` of a process holding one ESTABLISHED connection and one its peer reset (5 unread
    bytes): both are dumped (nothing refused, nothing lost) and `restore -D` gives both to the new program, the
    reset one reading b"hello", then ECONNRESET, then b"", and failing to send with EPIPE. No RST is sent."""
    with _holder_with_a_reset() as (holder, live, gone_port, closed):
        assert closed.tuple.remote_port == gone_port
        restored: subprocess.Popen[str] | None = None
        try:
            rsts = _tcp_counters()[1]
            code, out, err = run_main("dump", "--pid", str(holder.pid), "-D", str(tmp_path / "img"), "--json")
            assert code == 0, err
            report = json.loads(out)
            assert len(report["connections"]) == 2 and report["lost"] == []
            assert "refused" not in out + err
            images = {s.tcp_state: s for _, s in read_dir(tmp_path / "img")}
            assert sorted(images) == [1, CLOSE]
            assert (images[CLOSE].recv_queue, images[CLOSE].sk_err) == (b"hello", errno.ECONNRESET)
            assert images[CLOSE].tuple == closed.tuple
            restored = subprocess.Popen([sys.executable, "-m", "sockrepair.cli.main", "restore", "-D",
                                         str(tmp_path / "img"), "--exec", sys.executable, "-c", RESTORED],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            live.sendall(b"ping")
            assert restored.stdout is not None
            line = restored.stdout.readline()
            assert json.loads(line) == {"live": "ping", "closed": ["hello", "ECONNRESET", "", "EPIPE"]}, (
                line, restored.stderr.read() if restored.stderr else "")
            assert live.recv(4) == b"pong"
            assert _tcp_counters()[1] == rsts
            assert sockrepair.list_locks() == []
        finally:
            if restored is not None:
                restored.kill()
                restored.wait()


def test_inspect_and_a_dump_that_leaves_the_process_running_leave_a_pending_error_unread(netns, tmp_path) -> None:
    """Reading the error clears it, and these leave the program running: they do not checkpoint the reset
    connection, which still holds its bytes and its ECONNRESET afterwards."""
    with _holder_with_a_reset() as (holder, _, _, closed):
        assert closed.error_pending
        rows = {s.fd: (state, name) for s, state, name in inspect(holder.pid)}
        assert rows[closed.fd] == (None, "CLOSE, an error pending (left unread: only a move reads it)")
        report = dump(holder.pid, tmp_path / "img", after=After.LEAVE_RUNNING)
        assert [c["fd"] for c in report.connections] == [fd for fd, (state, _) in rows.items() if state is not None]
        with PidFd(holder.pid) as pidfd:
            copy = socket.socket(fileno=pidfd.getfd(closed.fd))
        with copy:
            assert copy.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
            assert copy.recv(100) == b"hello"


def test_a_process_listing_tells_a_pending_error_from_none(netns) -> None:
    """procfs lists CLOSE sockets that hold a peer (here this process's own), and flags only the one whose error
    is still to be read: poll shows POLLHUP for both, POLLERR for that one alone."""
    graceful_client, graceful = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    reset_client, reset = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with graceful_client, graceful, reset:
        _last_ack_acknowledged(graceful_client, graceful, None)  # type: ignore[arg-type]
        _reset(reset_client)
        _until(graceful, CLOSE)
        _until(reset, CLOSE)
        inodes = {s.fileno(): os.fstat(s.fileno()).st_ino for s in (graceful, reset)}
        listed = {s.fd: s for s in closed_connections(os.getpid(), inodes)}
        assert {fd: (s.tuple, s.tcp_state, s.error_pending) for fd, s in listed.items()} == {
            graceful.fileno(): (_peer_of_closed(graceful), CLOSE, False),
            reset.fileno(): (_peer_of_closed(reset), CLOSE, True)}
        assert reset.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET  # still there
