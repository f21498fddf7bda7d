"""The handshake-negotiated TCP options, the repair window and the timestamp clock: read and put back."""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._session import _Session, setsockopt
from sockrepair.state import RepairWindow, TcpOptions

TCP = lib.IPPROTO_TCP
TCP_INFO, TCP_MAXSEG, TCP_TIMESTAMP = lib.TCP_INFO, lib.TCP_MAXSEG, lib.TCP_TIMESTAMP
TCP_REPAIR_WINDOW, TCP_REPAIR_OPTIONS = lib.TCP_REPAIR_WINDOW, lib.TCP_REPAIR_OPTIONS
OPT_SACK, OPT_TIMESTAMPS, OPT_WSCALE = lib.TCPI_OPT_SACK, lib.TCPI_OPT_TIMESTAMPS, lib.TCPI_OPT_WSCALE
HEAD = tcpinfo.view("tcpi_state", "tcpi_options", "tcpi_wscales")
INFO_HEAD = HEAD.size  # the bytes of struct tcp_info that hold them
# u8 each: indexed, not unpacked (tcp_info_from runs per socket of a batch)
_OPTIONS_AT, _WSCALES_AT = tcpinfo.offset("tcpi_options"), tcpinfo.offset("tcpi_wscales")
WINDOW = struct.Struct("=5I")  # struct tcp_repair_window
# struct tcp_repair_opt[n] (opt_code, opt_val: u32 each), by the number of u32s: 1 to 4 options
OPTS = {2 * n: struct.Struct(f"={2 * n}I") for n in range(1, 5)}
MAXSEG, WINDOW_OPT = lib.TCPOPT_MAXSEG, lib.TCPOPT_WINDOW
SACK_PERM, TIMESTAMP_OPT = (lib.TCPOPT_SACK_PERM, 0), (lib.TCPOPT_TIMESTAMP, 0)


class TcpInfo(NamedTuple):
    """The leading bytes of struct tcp_info (linux/tcp.h) the engine reads; tcpi_wscales holds tcpi_snd_wscale in
    its low nibble and tcpi_rcv_wscale in its high one (bitfields, read whole)."""

    tcpi_state: int
    tcpi_options: int
    tcpi_wscales: int


# tuple.__new__ of the class: its generated __new__ (a Python function) costs as much again
_new_info = TcpInfo._make


def tcp_info(session: _Session) -> TcpInfo:
    """The state, options and window scales of TCP_INFO: its first INFO_HEAD bytes, which the kernel copies alone
    when asked for no more."""
    try:
        raw = session.sock.getsockopt(TCP, TCP_INFO, INFO_HEAD)
    except OSError as exc:
        raise session.failed("getsockopt(TCP_INFO)", exc) from None
    return _new_info(HEAD.unpack_from(raw))


def tcp_state(session: _Session) -> int:
    """TCP_INFO's tcpi_state alone: its first byte, which the kernel copies alone when asked for no more."""
    try:
        return session.sock.getsockopt(TCP, TCP_INFO, 1)[0]
    except OSError as exc:
        raise session.failed("getsockopt(TCP_INFO)", exc) from None


def tcp_info_from(session: _Session, state: int, head: bytes) -> TcpInfo:
    """TcpInfo from a sock_diag answer: `state` (its sk_state) and `head` (its INET_DIAG_INFO, INFO_HEAD bytes);
    TCP_INFO itself when the kernel sent no INET_DIAG_INFO (`head` b"")."""
    if len(head) >= INFO_HEAD:
        return _new_info((state, head[_OPTIONS_AT], head[_WSCALES_AT]))
    return tcp_info(session)


SEND_LIMITS = tcpinfo.view("tcpi_snd_mss", "tcpi_snd_cwnd")


def send_limits(session: _Session) -> tuple[int, int]:
    """TCP_INFO's tcpi_snd_mss (bytes) and tcpi_snd_cwnd (segments): what one burst can carry."""
    try:
        raw = session.sock.getsockopt(TCP, TCP_INFO, SEND_LIMITS.size)
    except OSError as exc:
        raise session.failed("getsockopt(TCP_INFO)", exc) from None
    mss, cwnd = SEND_LIMITS.unpack_from(raw)
    return int(mss), int(cwnd)


SEGS_IN = tcpinfo.view("tcpi_segs_in")


def segs_in(session: _Session) -> int:
    """TCP_INFO's tcpi_segs_in: segments the socket has taken in."""
    try:
        raw = session.sock.getsockopt(TCP, TCP_INFO, SEGS_IN.size)
    except OSError as exc:
        raise session.failed("getsockopt(TCP_INFO)", exc) from None
    return int(SEGS_IN.unpack_from(raw)[0])


def read_options(session: _Session, info: TcpInfo) -> TcpOptions:
    """The options negotiated in the handshake (from `info`) and, in repair mode, TCP_MAXSEG: the MSS clamp."""
    try:
        mss = session.sock.getsockopt(TCP, TCP_MAXSEG)
    except OSError as exc:
        raise session.failed("getsockopt(TCP_MAXSEG)", exc) from None
    opts = info.tcpi_options
    wscales = info.tcpi_wscales
    # positionally (a batch builds thousands): mss, sack, timestamps, wscale, snd_wscale, rcv_wscale
    return TcpOptions(mss, opts & OPT_SACK != 0, opts & OPT_TIMESTAMPS != 0, opts & OPT_WSCALE != 0, wscales & 0x0F,
                      wscales >> 4)


def restore_options(session: _Session, options: TcpOptions) -> None:
    """TCP_REPAIR_OPTIONS, accepted only between the repair-mode connect and the first byte sent. A struct goes
    through cffi: the socket method tries the value as an int and as None first, formatting an error each time,
    which costs more than cffi's call."""
    values = [MAXSEG, options.mss]
    if options.wscale:
        values += (WINDOW_OPT, options.snd_wscale | (options.rcv_wscale << 16))
    if options.sack:
        values += SACK_PERM
    if options.timestamps:
        values += TIMESTAMP_OPT
    raw = OPTS[len(values)].pack(*values)
    if setsockopt(session.fd, TCP, TCP_REPAIR_OPTIONS, raw, len(raw)) < 0:
        raise session.fail(f"setsockopt(TCP_REPAIR_OPTIONS {options})")


def set_user_mss(session: _Session, mss: int) -> None:
    try:
        session.sock.setsockopt(TCP, TCP_MAXSEG, mss)
    except OSError as exc:
        raise session.failed(f"setsockopt(TCP_MAXSEG={mss})", exc) from None


def resync_mss(session: _Session) -> None:
    """Make an IPv4 (or v4-mapped) socket sync its MSS again, now bounded by half the restored max_window as a new
    connection's is: setting IP_OPTIONS on a connected socket calls icsk_sync_mss (net/ipv4/ip_sockglue.c); with no
    options before and none after, nothing else changes."""
    if setsockopt(session.fd, lib.IPPROTO_IP, lib.IP_OPTIONS, ffi.NULL, 0) < 0:
        raise session.fail("setsockopt(IP_OPTIONS, none): MSS resync")


def read_window(session: _Session) -> RepairWindow | None:
    """struct tcp_repair_window, or None on kernels before 4.8, which lack TCP_REPAIR_WINDOW (the peer then sees a
    window that restarts small)."""
    try:
        raw = session.sock.getsockopt(TCP, TCP_REPAIR_WINDOW, WINDOW.size)
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT:
            return None
        raise session.failed("getsockopt(TCP_REPAIR_WINDOW)", exc) from None
    return RepairWindow(*WINDOW.unpack(raw))


def restore_window(session: _Session, window: RepairWindow) -> None:
    """TCP_REPAIR_WINDOW, through cffi as restore_options' struct."""
    raw = WINDOW.pack(window.snd_wl1, window.snd_wnd, window.max_window, window.rcv_wnd, window.rcv_wup)
    if setsockopt(session.fd, TCP, TCP_REPAIR_WINDOW, raw, WINDOW.size) < 0:
        raise session.fail(f"setsockopt(TCP_REPAIR_WINDOW {window})")


def read_timestamp(session: _Session) -> int:
    """The u32 as the kernel gives it: newer kernels keep a microsecond-clock flag in its low bit."""
    try:
        return int(session.sock.getsockopt(TCP, TCP_TIMESTAMP)) & 0xFFFFFFFF
    except OSError as exc:
        raise session.failed("getsockopt(TCP_TIMESTAMP)", exc) from None


def restore_timestamp(session: _Session, timestamp: int) -> None:
    """The u32 `timestamp` as the C int the kernel reads."""
    try:
        session.sock.setsockopt(TCP, TCP_TIMESTAMP, timestamp - (1 << 32) if timestamp & 0x80000000 else timestamp)
    except OSError as exc:
        raise session.failed(f"setsockopt(TCP_TIMESTAMP={timestamp})", exc) from None
