"""The handshake-negotiated TCP options, the repair window and the timestamp clock: read and put back."""

from __future__ import annotations

import errno
from typing import Any

from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._session import _Session, getsockopt, new, setsockopt
from sockrepair.state import RepairWindow, TcpOptions

TCP = lib.IPPROTO_TCP
TCP_INFO, TCP_MAXSEG, TCP_TIMESTAMP = lib.TCP_INFO, lib.TCP_MAXSEG, lib.TCP_TIMESTAMP
TCP_REPAIR_WINDOW, TCP_REPAIR_OPTIONS = lib.TCP_REPAIR_WINDOW, lib.TCP_REPAIR_OPTIONS
OPT_SACK, OPT_TIMESTAMPS, OPT_WSCALE = lib.TCPI_OPT_SACK, lib.TCPI_OPT_TIMESTAMPS, lib.TCPI_OPT_WSCALE
INFO_P = ffi.typeof("struct tcp_info_prefix *")
INFO_SIZE = ffi.sizeof("struct tcp_info_prefix")
WINDOW_P = ffi.typeof("struct tcp_repair_window *")
WINDOW_SIZE = ffi.sizeof("struct tcp_repair_window")
OPTS = ffi.typeof("struct tcp_repair_opt[]")
OPT_SIZE = ffi.sizeof("struct tcp_repair_opt")


def tcp_info(session: _Session) -> Any:
    """The leading part of struct tcp_info (linux/tcp.h) that the engine reads: state, options, window scales."""
    info = new(INFO_P)
    size = session.size
    size[0] = INFO_SIZE
    if getsockopt(session.fd, TCP, TCP_INFO, info, size) < 0:
        raise session.fail("getsockopt(TCP_INFO)")
    return info


def read_options(session: _Session, info: Any) -> TcpOptions:
    """The options negotiated in the handshake (from `info`) and, in repair mode, TCP_MAXSEG: the MSS clamp."""
    opts = info.tcpi_options
    wscales = info.tcpi_wscales
    return TcpOptions(
        mss=session.get(TCP, TCP_MAXSEG, "TCP_MAXSEG"),
        sack=bool(opts & OPT_SACK),
        timestamps=bool(opts & OPT_TIMESTAMPS),
        wscale=bool(opts & OPT_WSCALE),
        snd_wscale=wscales & 0x0F,
        rcv_wscale=wscales >> 4,
    )


def restore_options(session: _Session, options: TcpOptions) -> None:
    """TCP_REPAIR_OPTIONS, accepted only between the repair-mode connect and the first byte sent."""
    entries = [(lib.TCPOPT_MAXSEG, options.mss)]
    if options.wscale:
        entries.append((lib.TCPOPT_WINDOW, options.snd_wscale | (options.rcv_wscale << 16)))
    if options.sack:
        entries.append((lib.TCPOPT_SACK_PERM, 0))
    if options.timestamps:
        entries.append((lib.TCPOPT_TIMESTAMP, 0))
    if setsockopt(session.fd, TCP, TCP_REPAIR_OPTIONS, new(OPTS, entries), OPT_SIZE * len(entries)) < 0:
        raise session.fail(f"setsockopt(TCP_REPAIR_OPTIONS {options})")


def set_user_mss(session: _Session, mss: int) -> None:
    session.set(TCP, TCP_MAXSEG, mss, "TCP_MAXSEG")


def resync_mss(session: _Session) -> None:
    """Make an IPv4 (or v4-mapped) socket sync its MSS again, now bounded by half the restored max_window as a new
    connection's is: setting IP_OPTIONS on a connected socket calls icsk_sync_mss (net/ipv4/ip_sockglue.c); with no
    options before and none after, nothing else changes."""
    if setsockopt(session.fd, lib.IPPROTO_IP, lib.IP_OPTIONS, ffi.NULL, 0) < 0:
        raise session.fail("setsockopt(IP_OPTIONS, none): MSS resync")


def read_window(session: _Session) -> RepairWindow | None:
    """struct tcp_repair_window, or None on kernels before 4.8, which lack TCP_REPAIR_WINDOW (the peer then sees a
    window that restarts small)."""
    w = new(WINDOW_P)
    size = session.size
    size[0] = WINDOW_SIZE
    if getsockopt(session.fd, TCP, TCP_REPAIR_WINDOW, w, size) < 0:
        exc = session.fail("getsockopt(TCP_REPAIR_WINDOW)")
        if exc.errno == errno.ENOPROTOOPT:
            return None
        raise exc
    return RepairWindow(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup)


def restore_window(session: _Session, window: RepairWindow) -> None:
    buf = new(WINDOW_P, (window.snd_wl1, window.snd_wnd, window.max_window, window.rcv_wnd, window.rcv_wup))
    if setsockopt(session.fd, TCP, TCP_REPAIR_WINDOW, buf, WINDOW_SIZE) < 0:
        raise session.fail(f"setsockopt(TCP_REPAIR_WINDOW {window})")


def read_timestamp(session: _Session) -> int:
    """The u32 as the kernel gives it: newer kernels keep a microsecond-clock flag in its low bit."""
    return session.get_u32(TCP, TCP_TIMESTAMP, "TCP_TIMESTAMP")


def restore_timestamp(session: _Session, timestamp: int) -> None:
    session.set_u32(TCP, TCP_TIMESTAMP, timestamp, "TCP_TIMESTAMP")
