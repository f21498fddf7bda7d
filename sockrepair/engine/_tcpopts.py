"""The handshake-negotiated TCP options, the repair window and the timestamp clock: read and put back."""

from __future__ import annotations

import errno
from typing import Any

from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._sockcall import (
    SOCKLEN_P,
    IntCalls,
    fail,
    getsockopt,
    new,
    setsockopt,
)
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


def tcp_info(fd: int) -> Any:
    info = new(INFO_P)
    if getsockopt(fd, TCP, TCP_INFO, info, new(SOCKLEN_P, INFO_SIZE)) < 0:
        raise fail("getsockopt(TCP_INFO)", fd)
    return info


def read_options(fd: int, info: Any, calls: IntCalls | None = None) -> TcpOptions:
    opts = info.tcpi_options
    wscales = info.tcpi_wscales
    return TcpOptions(
        mss=(calls or IntCalls(fd)).get(TCP, TCP_MAXSEG, "TCP_MAXSEG"),
        sack=bool(opts & OPT_SACK),
        timestamps=bool(opts & OPT_TIMESTAMPS),
        wscale=bool(opts & OPT_WSCALE),
        snd_wscale=wscales & 0x0F,
        rcv_wscale=wscales >> 4,
    )


def restore_options(fd: int, options: TcpOptions) -> None:
    """TCP_REPAIR_OPTIONS, accepted only between the repair-mode connect and the first byte sent."""
    entries = [(lib.TCPOPT_MAXSEG, options.mss)]
    if options.wscale:
        entries.append((lib.TCPOPT_WINDOW, options.snd_wscale | (options.rcv_wscale << 16)))
    if options.sack:
        entries.append((lib.TCPOPT_SACK_PERM, 0))
    if options.timestamps:
        entries.append((lib.TCPOPT_TIMESTAMP, 0))
    if setsockopt(fd, TCP, TCP_REPAIR_OPTIONS, new(OPTS, entries), OPT_SIZE * len(entries)) < 0:
        raise fail(f"setsockopt(TCP_REPAIR_OPTIONS {options})", fd)


def set_user_mss(fd: int, mss: int, calls: IntCalls | None = None) -> None:
    (calls or IntCalls(fd)).set(TCP, TCP_MAXSEG, mss, "TCP_MAXSEG")


def read_window(fd: int) -> RepairWindow | None:
    """None on kernels before 4.8, which lack TCP_REPAIR_WINDOW (the peer then sees a window that restarts small)."""
    w = new(WINDOW_P)
    if getsockopt(fd, TCP, TCP_REPAIR_WINDOW, w, new(SOCKLEN_P, WINDOW_SIZE)) < 0:
        exc = fail("getsockopt(TCP_REPAIR_WINDOW)", fd)
        if exc.errno == errno.ENOPROTOOPT:
            return None
        raise exc
    return RepairWindow(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup)


def restore_window(fd: int, window: RepairWindow) -> None:
    buf = new(WINDOW_P, (window.snd_wl1, window.snd_wnd, window.max_window, window.rcv_wnd, window.rcv_wup))
    if setsockopt(fd, TCP, TCP_REPAIR_WINDOW, buf, WINDOW_SIZE) < 0:
        raise fail(f"setsockopt(TCP_REPAIR_WINDOW {window})", fd)


def read_timestamp(fd: int, calls: IntCalls | None = None) -> int:
    """The u32 as the kernel gives it: newer kernels keep a microsecond-clock flag in its low bit."""
    return (calls or IntCalls(fd)).get_u32(TCP, TCP_TIMESTAMP, "TCP_TIMESTAMP")


def restore_timestamp(fd: int, timestamp: int, calls: IntCalls | None = None) -> None:
    (calls or IntCalls(fd)).set_u32(TCP, TCP_TIMESTAMP, timestamp, "TCP_TIMESTAMP")
