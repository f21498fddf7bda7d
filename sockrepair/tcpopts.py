"""The handshake-negotiated TCP options, the repair window and the timestamp clock: read and put back."""

from __future__ import annotations

import errno
from typing import Any

from ._ffi import ffi, lib
from .errors import SocketCallError
from .sockcall import fail, get_int, get_struct, get_u32, set_int, set_struct, set_u32
from .state import RepairWindow, TcpOptions

TCP = lib.IPPROTO_TCP


def tcp_info(fd: int) -> Any:
    return get_struct(fd, TCP, lib.TCP_INFO, "struct tcp_info_prefix", "TCP_INFO")


def read_options(fd: int, info: Any) -> TcpOptions:
    opts = info.tcpi_options
    wscales = info.tcpi_wscales
    return TcpOptions(
        mss=get_int(fd, TCP, lib.TCP_MAXSEG, "TCP_MAXSEG"),
        sack=bool(opts & lib.TCPI_OPT_SACK),
        timestamps=bool(opts & lib.TCPI_OPT_TIMESTAMPS),
        wscale=bool(opts & lib.TCPI_OPT_WSCALE),
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
    buf = ffi.new("struct tcp_repair_opt[]", entries)
    if lib.setsockopt(fd, TCP, lib.TCP_REPAIR_OPTIONS, buf, ffi.sizeof(buf)) < 0:
        raise fail(f"setsockopt(TCP_REPAIR_OPTIONS {options})", fd)


def set_user_mss(fd: int, mss: int) -> None:
    set_int(fd, TCP, lib.TCP_MAXSEG, mss, "TCP_MAXSEG")


def read_window(fd: int) -> RepairWindow | None:
    """None on kernels before 4.8, which lack TCP_REPAIR_WINDOW (the peer then sees a window that restarts small)."""
    try:
        w = get_struct(fd, TCP, lib.TCP_REPAIR_WINDOW, "struct tcp_repair_window", "TCP_REPAIR_WINDOW")
    except SocketCallError as exc:
        if exc.errno == errno.ENOPROTOOPT:
            return None
        raise
    return RepairWindow(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup)


def restore_window(fd: int, window: RepairWindow) -> None:
    buf = ffi.new(
        "struct tcp_repair_window *",
        (window.snd_wl1, window.snd_wnd, window.max_window, window.rcv_wnd, window.rcv_wup),
    )
    set_struct(fd, TCP, lib.TCP_REPAIR_WINDOW, buf, f"TCP_REPAIR_WINDOW {window}")


def read_timestamp(fd: int) -> int:
    """The u32 as the kernel gives it: newer kernels keep a microsecond-clock flag in its low bit."""
    return get_u32(fd, TCP, lib.TCP_TIMESTAMP, "TCP_TIMESTAMP")


def restore_timestamp(fd: int, timestamp: int) -> None:
    set_u32(fd, TCP, lib.TCP_TIMESTAMP, timestamp, "TCP_TIMESTAMP")
