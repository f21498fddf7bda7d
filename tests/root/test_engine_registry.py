"""sockrepair.engine.registry held to the kernel: every CARRIED option set to a non-default value survives a move and
reads back the same; every REFUSED one is refused before repair mode, naming it, with the socket untouched; the
restored socket's TCP_INFO matches the original's side by side."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import sockrepair
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine import registry
from sockrepair.state import ConnectionState
from tests.root.conftest import _make_pair
from tests.root.pairs import FAMILIES, loopback_pair
from tests.root.streams import recv_exactly

SOL, TCP, IP = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP


def _timeval(secs: int, usecs: int) -> bytes:
    return struct.pack("=qq", secs, usecs)


# field -> (level, option, value to set (int or bytes), bytes to read back (0: an int))
CARRIED: dict[str, tuple[int, int, int | bytes, int]] = {
    "keepalive": (SOL, socket.SO_KEEPALIVE, 1, 0),
    "reuseaddr": (SOL, socket.SO_REUSEADDR, 1, 0),
    "reuseport": (SOL, socket.SO_REUSEPORT, 1, 0),
    "priority": (SOL, socket.SO_PRIORITY, 3, 0),
    "mark": (SOL, 36, 7, 0),
    "linger_on": (SOL, socket.SO_LINGER, struct.pack("=ii", 1, 5), 8),
    "bindtodevice": (SOL, 25, b"lo", 16),
    "rcvlowat": (SOL, socket.SO_RCVLOWAT, 10, 0),
    "rcvtimeo_us": (SOL, 20, _timeval(1, 0), 16),
    "sndtimeo_us": (SOL, 21, _timeval(2, 500_000), 16),
    "oobinline": (SOL, socket.SO_OOBINLINE, 1, 0),
    "busy_poll": (SOL, 46, 50, 0),
    "max_pacing_rate": (SOL, 47, 1_000_000, 0),
    "nodelay": (TCP, socket.TCP_NODELAY, 1, 0),
    "cork": (TCP, socket.TCP_CORK, 1, 0),
    "keepidle": (TCP, socket.TCP_KEEPIDLE, 30, 0),
    "keepintvl": (TCP, socket.TCP_KEEPINTVL, 7, 0),
    "keepcnt": (TCP, socket.TCP_KEEPCNT, 3, 0),
    "linger2": (TCP, 8, 17, 0),
    "window_clamp": (TCP, 10, 40_000, 0),
    "congestion": (TCP, 13, b"reno", 16),
    "thin_linear": (TCP, 16, 1, 0),
    "user_timeout": (TCP, 18, 5000, 0),
    "notsent_lowat": (TCP, 25, 16384, 0),
    "tcp_inq": (TCP, 36, 1, 0),
    "rto_max_ms": (TCP, 44, 60_000, 0),
    "rto_min_us": (TCP, 45, 50_000, 0),
    "delack_max_us": (TCP, 46, 10_000, 0),
    "tos": (IP, socket.IP_TOS, 0x20, 0),
    "ttl": (IP, socket.IP_TTL, 33, 0),
    "freebind": (IP, 15, 1, 0),
    "mtu_discover": (IP, 10, 0, 0),
}
# Covered elsewhere or by another row: the buffers are restored at least as large (test_engine_queues), v6only
# needs an IPv6 socket (test_engine_families), linger_secs is SO_LINGER's second half.
NOT_IN_TABLE = {"sndbuf", "rcvbuf", "v6only", "linger_secs"}


def _read(sock: socket.socket, level: int, opt: int, size: int) -> Any:
    return sock.getsockopt(level, opt, size) if size else sock.getsockopt(level, opt)


def _move(sock: socket.socket) -> tuple[socket.socket, ConnectionState]:
    state = sockrepair.checkpoint(sock)
    sockrepair.discard(sock, state)
    back = ConnectionState.from_bytes(state.to_bytes())
    assert back == state
    return sockrepair.restore(back), state


def test_every_carried_sockopt_has_a_row() -> None:
    carried = set(registry.carried_sockopts())
    assert carried - set(CARRIED) == NOT_IN_TABLE
    assert set(CARRIED) <= carried


@pytest.mark.parametrize("field", sorted(CARRIED))
def test_a_carried_option_survives_the_move(make_pair, field: str) -> None:
    level, opt, value, size = CARRIED[field]
    client, server = make_pair()
    if isinstance(value, bytes):
        server.setsockopt(level, opt, value)
    else:
        server.setsockopt(level, opt, value)
    before = _read(server, level, opt, size)
    restored, state = _move(server)
    try:
        assert getattr(state.sockopts, field) != getattr(type(state.sockopts)(), field) or field == "mtu_discover"
        assert _read(restored, level, opt, size) == before
        # and the connection works
        restored.setsockopt(TCP, socket.TCP_CORK, 0)
        restored.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
    finally:
        restored.close()


def test_every_option_left_at_its_default_reads_back_the_same(make_pair) -> None:
    """Restore skips setting an option whose saved value is the one every new socket has: on a connection that set
    nothing, every carried option must still read back as on the source (a skip of a value a new socket does not
    have, e.g. one that follows a sysctl, would show here), and then with every one set at once."""
    for set_all in (False, True):
        _, server = make_pair()
        if set_all:
            for level, opt, value, _ in CARRIED.values():
                server.setsockopt(level, opt, value)
        before = {field: _read(server, level, opt, size) for field, (level, opt, _, size) in CARRIED.items()}
        restored, _ = _move(server)
        try:
            assert {field: _read(restored, level, opt, size)
                    for field, (level, opt, _, size) in CARRIED.items()} == before, f"set_all={set_all}"
        finally:
            restored.close()


def test_a_priority_of_0_after_a_tos_survives_the_move(make_pair) -> None:
    """Setting IP_TOS sets the priority too (0x10 gives 6); the application set it back to 0, a new socket's value,
    which restore must set all the same after the TOS (it skips an option at a new socket's value otherwise)."""
    _, server = make_pair()
    server.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
    assert server.getsockopt(SOL, socket.SO_PRIORITY) != 0
    server.setsockopt(SOL, socket.SO_PRIORITY, 0)
    restored, _ = _move(server)
    try:
        assert (restored.getsockopt(socket.IPPROTO_IP, socket.IP_TOS),
                restored.getsockopt(SOL, socket.SO_PRIORITY)) == (0x10, 0)
    finally:
        restored.close()


def test_receive_timeout_fires_after_the_move(make_pair) -> None:
    _, server = make_pair()
    server.setsockopt(SOL, 20, _timeval(0, 300_000))
    restored, _ = _move(server)
    outcome: list[object] = []

    def blocking_recv() -> None:
        try:
            outcome.append(restored.recv(1))
        except OSError as exc:
            outcome.append(exc.errno)

    reader = threading.Thread(target=blocking_recv, daemon=True)
    reader.start()
    reader.join(20)  # a generous bound only against a hang; the timeout itself is 0.3 s
    try:
        assert outcome == [errno.EAGAIN], "recv did not time out: SO_RCVTIMEO was lost"
    finally:
        restored.close()


# ---- refused: each is refused before repair mode, naming its entry, and the socket goes on untouched -------------

def _md5_pair(family: int, addr: str) -> tuple[socket.socket, socket.socket]:
    def key(sock: socket.socket) -> bytes:
        peer = socket.inet_pton(family, addr)
        ss = (struct.pack("=H", family) + b"\0\0" + peer + bytes(124)) if family == socket.AF_INET else (
            struct.pack("=H", family) + b"\0\0" + b"\0\0\0\0" + peer + bytes(104))
        return ss[:128] + struct.pack("=BBHI", 0, 0, 5, 0) + b"hello" + bytes(75)

    with socket.socket(family) as listener:
        listener.setsockopt(TCP, 14, key(listener))
        listener.bind((addr, 0))
        listener.listen()
        client = socket.socket(family)
        client.setsockopt(TCP, 14, key(client))
        client.connect(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


def _attach_filter(sock: socket.socket) -> None:
    """SO_ATTACH_FILTER with a one-instruction classic BPF program that accepts every packet (BPF_RET | BPF_K)."""
    insns = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0xFFFFFFFF))
    sock.setsockopt(SOL, 26, struct.pack("=HxxxxxxQ", 1, ctypes.addressof(insns)))


def _urgent_unread(client: socket.socket, server: socket.socket) -> None:
    client.send(b"abc")
    client.send(b"X", socket.MSG_OOB)
    client.sendall(b"def")
    recv_until(server, 3)


def _urgent_read(client: socket.socket, server: socket.socket) -> None:
    _urgent_unread(client, server)
    assert server.recv(1, socket.MSG_OOB) == b"X"


def recv_until(sock: socket.socket, inq: int) -> None:
    """Wait until SIOCINQ shows `inq` bytes (what is before an urgent mark)."""
    deadline = time.monotonic() + 10
    while struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0] < inq:
        assert time.monotonic() < deadline, "data never arrived"
        time.sleep(0.005)
    time.sleep(0.05)  # the bytes after the mark arrive in their own segment


REFUSED: dict[str, Callable[[socket.socket, socket.socket], None]] = {
    "SO_DONTROUTE": lambda c, s: s.setsockopt(SOL, socket.SO_DONTROUTE, 1),
    "SO_TIMESTAMP/SO_TIMESTAMPNS/SO_TIMESTAMPING": lambda c, s: s.setsockopt(SOL, 29, 1),
    "SO_ZEROCOPY": lambda c, s: s.setsockopt(SOL, 60, 1),
    "SO_PEEK_OFF": lambda c, s: s.setsockopt(SOL, 42, 0),
    "TCP_TX_DELAY": lambda c, s: s.setsockopt(TCP, 37, 1000),
    "IP_TRANSPARENT/IPV6_TRANSPARENT": lambda c, s: s.setsockopt(IP, 19, 1),
    "IP_RECVERR/IPV6_RECVERR": lambda c, s: s.setsockopt(IP, 11, 1),
    "IP_MINTTL/IPV6_MINHOPCOUNT": lambda c, s: s.setsockopt(IP, 21, 5),
    "IP_OPTIONS/IPV6_HOPOPTS/IPV6_RTHDR/IPV6_DSTOPTS/IPV6_RTHDRDSTOPTS":
        lambda c, s: s.setsockopt(IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00"),
    "SO_ATTACH_FILTER/SO_ATTACH_BPF": lambda c, s: _attach_filter(s),
    "urgent data (MSG_OOB)": _urgent_unread,
    "shutdown(SHUT_RD)": lambda c, s: s.shutdown(socket.SHUT_RD),
}
# Refused entries with their own test below, or that this kernel cannot show.
REFUSED_ELSEWHERE = {
    "TCP_MD5SIG/TCP_MD5SIG_EXT": "test_md5_keys_are_refused",
    "TCP_ULP": "test_ktls_is_refused (skipped without the tls module)",
    "TCP_AO_INFO/TCP_AO_GET_KEYS/TCP_AO_REPAIR": "this kernel has no CONFIG_TCP_AO (TCP_AO_INFO: ENOPROTOOPT)",
    "IPPROTO_MPTCP": "tests/root/test_engine_losses.py and test_mptcp_is_named",
    "INET_DIAG_MD5SIG": "an alias of TCP_MD5SIG",
    "INET_DIAG_ULP_INFO": "an alias of TCP_ULP",
}


def test_every_refused_entry_has_a_case() -> None:
    refused = {e.name for e in registry.ENTRIES if e.status is registry.Status.REFUSED}
    assert refused == set(REFUSED) | set(REFUSED_ELSEWHERE)


def _assert_refused_untouched(client: socket.socket, server: socket.socket, entry: str) -> None:
    with pytest.raises(sockrepair.SocketStateError) as caught:
        sockrepair.checkpoint(server)
    err = caught.value
    assert f"({entry})" in str(err), str(err)
    assert (err.fd, err.tcp_state) == (server.fileno(), 1)
    assert str(err).startswith(f"fd {server.fileno()} ({err.tuple}) uses what TCP_REPAIR cannot move")
    # not in repair mode: it still sends at once
    server.sendall(b"still here")
    assert recv_exactly(client, 10) == b"still here"


@pytest.mark.parametrize("entry", sorted(REFUSED))
def test_a_refused_option_is_refused_before_repair_mode(make_pair, entry: str) -> None:
    client, server = make_pair()
    REFUSED[entry](client, server)
    _assert_refused_untouched(client, server, entry)


def test_urgent_data_already_read_still_refused_and_nothing_lost(make_pair) -> None:
    client, server = make_pair()
    _urgent_read(client, server)
    _assert_refused_untouched(client, server, "urgent data (MSG_OOB)")
    server.settimeout(10)
    assert recv_exactly(server, 3) == b"abc"
    assert recv_exactly(server, 3) == b"def"


def test_urgent_data_refused_names_the_byte_and_keeps_it(make_pair) -> None:
    client, server = make_pair()
    _urgent_unread(client, server)
    with pytest.raises(sockrepair.SocketStateError, match=r"an urgent byte b'X' not yet read"):
        sockrepair.checkpoint(server)
    assert server.recv(1, socket.MSG_OOB) == b"X"
    assert recv_exactly(server, 6) == b"abcdef"


@pytest.mark.parametrize(("family", "addr"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_md5_keys_are_refused(netns, family: int, addr: str) -> None:
    client, server = _md5_pair(family, addr)
    try:
        _assert_refused_untouched(client, server, "TCP_MD5SIG/TCP_MD5SIG_EXT")
        assert "1 TCP-MD5 key(s)" in _refusal(server)
    finally:
        client.close()
        server.close()


def _refusal(sock: socket.socket) -> str:
    with pytest.raises(sockrepair.SocketStateError) as caught:
        sockrepair.checkpoint(sock)
    return str(caught.value)


def test_ktls_is_refused(make_pair) -> None:
    client, server = make_pair()
    try:
        server.setsockopt(TCP, 31, b"tls")
    except OSError as exc:
        pytest.skip(f"no kTLS here: {exc}")
    assert "upper-layer protocol 'tls' (kTLS)" in _refusal(server)


def test_mptcp_is_named(netns) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as client:
            client.connect(listener.getsockname())
            server, _ = listener.accept()
            with server, pytest.raises(sockrepair.SocketStateError, match="is an MPTCP socket"):
                sockrepair.checkpoint(server)


# ---- the restored socket behaves like the original -----------------------------------------------------------------

def _info(sock: socket.socket) -> dict[str, int]:
    """The TCP_INFO fields a restored socket must share with the original."""
    fields = ("tcpi_state", "tcpi_options", "tcpi_wscales", "tcpi_snd_mss", "tcpi_snd_wnd")
    return dict(zip(fields, tcpinfo.read(sock, *fields), strict=True))


def _rcv_wnd(sock: socket.socket) -> int:
    return tcpinfo.read(sock, "tcpi_rcv_wnd")[0]


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
@pytest.mark.parametrize("peer_rcvbuf", [4096, 0], ids=["peer-window-4KiB", "default-window"])
def test_tcp_info_side_by_side(netns, family: int, listen_addr: str, connect_addr: str, peer_rcvbuf: int) -> None:
    if peer_rcvbuf:
        client, server = _small_window_pair(family, listen_addr, connect_addr, peer_rcvbuf)
    else:
        client, server = loopback_pair(family, listen_addr, connect_addr)
    try:
        before = _info(server)
        restored, state = _move(server)
        with restored:
            after = _info(restored)
            if state.tuple.wire().family == socket.AF_INET6:
                # IPv6 has no call that resyncs the MSS: the connect takes it from the user MSS, which the kernel
                # caps at 32767 (MAX_TCP_WINDOW), less the timestamp option's 12 bytes
                before["tcpi_snd_mss"] = min(before["tcpi_snd_mss"], 32767 - 12)
            assert after == before
            assert state.window is not None and after["tcpi_snd_wnd"] == state.window.snd_wnd
            # the window we advertise: the restored socket recomputes it when it sends its window probe, in units
            # of its window scale, never below what the peer was told (tcp_select_window)
            unit = 1 << state.options.rcv_wscale if state.options.wscale else 1
            assert state.window.rcv_wnd <= _rcv_wnd(restored) < state.window.rcv_wnd + unit
            # and it moves data at once: a segment larger than the peer's window would wait for the probe timer
            data = bytes(range(256)) * 4096
            sender = threading.Thread(target=restored.sendall, args=(data,))
            sender.start()
            assert recv_exactly(client, len(data)) == data
            sender.join()
    finally:
        client.close()


def _small_window_pair(family: int, listen_addr: str, connect_addr: str,
                       rcvbuf: int) -> tuple[socket.socket, socket.socket]:
    with socket.socket(family) as listener:
        listener.bind((listen_addr, 0))
        listener.listen()
        client = socket.socket(socket.AF_INET6 if ":" in connect_addr else socket.AF_INET)
        client.setsockopt(SOL, socket.SO_RCVBUF, rcvbuf)
        client.connect((connect_addr, listener.getsockname()[1]))
        server, _ = listener.accept()
    return client, server


def test_notsent_lowat_does_not_limit_the_restore(netns) -> None:
    """A peer that stopped reading leaves tens of KiB never sent; TCP_NOTSENT_LOWAT 16384 would refuse them."""
    client, server = _make_pair(socket.AF_INET, "127.0.0.1", client_rcvbuf=4096)
    try:
        server.setblocking(False)
        sent = 0
        chunk = bytes(range(256)) * 64
        while True:
            try:
                sent += server.send(chunk)
            except BlockingIOError:
                break
        server.setsockopt(TCP, 25, 16384)
        state = sockrepair.checkpoint(server)
        assert state.unsent_len > 16384
        sockrepair.discard(server, state)
        restored = sockrepair.restore(state)
        with restored:
            assert restored.getsockopt(TCP, 25) == 16384
            got = recv_exactly(client, sent)
            assert got == (chunk * (sent // len(chunk) + 1))[:sent]
    finally:
        client.close()
