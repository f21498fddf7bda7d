"""Application-visible socket options: read from the old socket, put back on the new one at the right moment.

Options that steer routing or binding must be on the socket before bind/connect; SO_REUSEADDR only after repair is
off, because leaving repair mode resets the socket's reuse flag."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, fields

from ._ffi import ffi, lib
from .errors import SocketCallError
from .sockcall import get_bytes, get_int, get_struct, set_bytes, set_int, set_struct
from .state import SocketOptions

TCP, SOL, IP, IPV6 = lib.IPPROTO_TCP, lib.SOL_SOCKET, lib.IPPROTO_IP, lib.IPPROTO_IPV6
IFNAMSIZ = 16
TCP_CA_NAME_MAX = 16


@dataclass(frozen=True)
class IntOpt:
    """An int-valued option; `family` limits it to sockets of one address family (None: any)."""

    field: str
    level: int
    opt: int
    name: str
    family: int | None = None


def _int_opts(family: int) -> list[IntOpt]:
    ip_level = [
        IntOpt("tos", IP, lib.IP_TOS, "IP_TOS", socket.AF_INET),
        IntOpt("ttl", IP, lib.IP_TTL, "IP_TTL", socket.AF_INET),
        IntOpt("tos", IPV6, lib.IPV6_TCLASS, "IPV6_TCLASS", socket.AF_INET6),
        IntOpt("ttl", IPV6, lib.IPV6_UNICAST_HOPS, "IPV6_UNICAST_HOPS", socket.AF_INET6),
    ]
    return [o for o in ip_level if o.family == family] + GENERIC_INT_OPTS


GENERIC_INT_OPTS = [
    IntOpt("nodelay", TCP, lib.TCP_NODELAY, "TCP_NODELAY"),
    IntOpt("keepalive", SOL, lib.SO_KEEPALIVE, "SO_KEEPALIVE"),
    IntOpt("keepidle", TCP, lib.TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    IntOpt("keepintvl", TCP, lib.TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    IntOpt("keepcnt", TCP, lib.TCP_KEEPCNT, "TCP_KEEPCNT"),
    IntOpt("reuseport", SOL, lib.SO_REUSEPORT, "SO_REUSEPORT"),
    IntOpt("priority", SOL, lib.SO_PRIORITY, "SO_PRIORITY"),
    IntOpt("rcvlowat", SOL, lib.SO_RCVLOWAT, "SO_RCVLOWAT"),
    IntOpt("user_timeout", TCP, lib.TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT"),
    IntOpt("notsent_lowat", TCP, lib.TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT"),
    IntOpt("cork", TCP, lib.TCP_CORK, "TCP_CORK"),
]
# Route and bind decisions read these, so they go on before bind() and connect().
PRE_BIND_INT_OPTS = [
    IntOpt("mark", SOL, lib.SO_MARK, "SO_MARK"),
    IntOpt("freebind", IP, lib.IP_FREEBIND, "IP_FREEBIND"),
]
V6ONLY = IntOpt("v6only", IPV6, lib.IPV6_V6ONLY, "IPV6_V6ONLY", socket.AF_INET6)
BOOL_FIELDS = {f.name for f in fields(SocketOptions) if f.type in ("bool", bool)}


def _value(field: str, raw: int) -> int | bool:
    return bool(raw) if field in BOOL_FIELDS else raw


def read_sockopts(fd: int, family: int) -> SocketOptions:
    """Must run before repair mode is switched on: repair mode forces the reuse flag, which SO_REUSEADDR reports."""
    values: dict[str, object] = {}
    opts = _int_opts(family) + PRE_BIND_INT_OPTS + ([V6ONLY] if family == socket.AF_INET6 else [])
    for o in opts:
        values[o.field] = _value(o.field, get_int(fd, o.level, o.opt, o.name))
    values["reuseaddr"] = bool(get_int(fd, SOL, lib.SO_REUSEADDR, "SO_REUSEADDR"))
    values["sndbuf"] = get_int(fd, SOL, lib.SO_SNDBUF, "SO_SNDBUF")
    values["rcvbuf"] = get_int(fd, SOL, lib.SO_RCVBUF, "SO_RCVBUF")
    linger = get_struct(fd, SOL, lib.SO_LINGER, "struct linger", "SO_LINGER")
    values["linger_on"] = bool(linger.l_onoff)
    values["linger_secs"] = int(linger.l_linger)
    values["bindtodevice"] = _cstr(get_bytes(fd, SOL, lib.SO_BINDTODEVICE, IFNAMSIZ, "SO_BINDTODEVICE"))
    values["congestion"] = _cstr(get_bytes(fd, TCP, lib.TCP_CONGESTION, TCP_CA_NAME_MAX, "TCP_CONGESTION"))
    return SocketOptions(**values)  # type: ignore[arg-type]


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def apply_pre_bind(fd: int, family: int, so: SocketOptions) -> None:
    for o in PRE_BIND_INT_OPTS:
        value = int(getattr(so, o.field))
        if value:
            set_int(fd, o.level, o.opt, value, o.name)
    if family == socket.AF_INET6:
        set_int(fd, IPV6, lib.IPV6_V6ONLY, int(so.v6only), "IPV6_V6ONLY")
    if so.bindtodevice:
        set_bytes(fd, SOL, lib.SO_BINDTODEVICE, so.bindtodevice.encode(), "SO_BINDTODEVICE")


def size_buffers(fd: int, so: SocketOptions, send_bytes: int, recv_bytes: int) -> None:
    """Give the new socket room for its queues. The kernel charges roughly twice the payload (skb overhead), and
    getsockopt reports the doubled figure that setsockopt will double again, hence the halving."""
    sndbuf = max(so.sndbuf, 2 * send_bytes + (64 << 10))
    rcvbuf = max(so.rcvbuf, 2 * recv_bytes + (64 << 10))
    set_int(fd, SOL, lib.SO_SNDBUFFORCE, sndbuf // 2, "SO_SNDBUFFORCE")
    set_int(fd, SOL, lib.SO_RCVBUFFORCE, rcvbuf // 2, "SO_RCVBUFFORCE")


def apply_in_repair(fd: int, family: int, so: SocketOptions) -> None:
    """Everything but the reuse flag, while still in repair mode: cork and nodelay must hold before the never-sent
    bytes are written."""
    for o in _int_opts(family):
        set_int(fd, o.level, o.opt, int(getattr(so, o.field)), o.name)
    linger = ffi.new("struct linger *", (int(so.linger_on), so.linger_secs))
    set_struct(fd, SOL, lib.SO_LINGER, linger, "SO_LINGER")
    if so.congestion:
        try:
            set_bytes(fd, TCP, lib.TCP_CONGESTION, so.congestion.encode(), "TCP_CONGESTION")
        except SocketCallError as exc:
            if exc.errno == errno.ENOENT:
                raise SocketCallError(
                    exc.errno, f"setsockopt(TCP_CONGESTION={so.congestion!r}): congestion control "
                    f"{so.congestion!r} is not available on this host (modprobe tcp_{so.congestion})", fd
                ) from None
            raise


def apply_after_repair(fd: int, so: SocketOptions) -> None:
    set_int(fd, SOL, lib.SO_REUSEADDR, int(so.reuseaddr), "SO_REUSEADDR")
