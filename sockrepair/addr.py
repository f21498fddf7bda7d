"""sockaddr conversions between the kernel's layouts and ConnTuple."""

from __future__ import annotations

import socket
from typing import Any

from ._ffi import ffi, lib
from .sockcall import fail
from .state import ConnTuple


def _decode(sa: Any) -> tuple[int, str, int]:
    family = sa.ss_family
    if family == lib.AF_INET:
        sin = ffi.cast("struct sockaddr_in *", sa)
        return family, socket.inet_ntop(socket.AF_INET, bytes(sin.sin_addr)), socket.ntohs(sin.sin_port)
    if family == lib.AF_INET6:
        sin6 = ffi.cast("struct sockaddr_in6 *", sa)
        return family, socket.inet_ntop(socket.AF_INET6, bytes(sin6.sin6_addr)), socket.ntohs(sin6.sin6_port)
    raise ValueError(f"address family {family} is not IPv4 or IPv6")


def read_tuple(fd: int) -> ConnTuple:
    sa = ffi.new("struct sockaddr_storage *")
    size = ffi.new("socklen_t *", ffi.sizeof("struct sockaddr_storage"))
    if lib.getsockname(fd, ffi.cast("struct sockaddr *", sa), size) < 0:
        raise fail("getsockname", fd)
    family, laddr, lport = _decode(sa)
    size[0] = ffi.sizeof("struct sockaddr_storage")
    if lib.getpeername(fd, ffi.cast("struct sockaddr *", sa), size) < 0:
        raise fail("getpeername", fd)
    _, raddr, rport = _decode(sa)
    return ConnTuple(family, laddr, lport, raddr, rport)


def sockaddr(family: int, addr: str, port: int) -> Any:
    """A struct sockaddr_in/sockaddr_in6 for bind/connect; callers cast it in the call so that it stays alive."""
    if family == lib.AF_INET:
        sin = ffi.new("struct sockaddr_in *")
        sin.sin_family = family
        sin.sin_port = socket.htons(port)
        ffi.memmove(sin.sin_addr, socket.inet_pton(socket.AF_INET, addr), 4)
        return sin
    sin6 = ffi.new("struct sockaddr_in6 *")
    sin6.sin6_family = family
    sin6.sin6_port = socket.htons(port)
    ffi.memmove(sin6.sin6_addr, socket.inet_pton(socket.AF_INET6, addr), 16)
    return sin6


def bind(fd: int, family: int, addr: str, port: int) -> None:
    sa = sockaddr(family, addr, port)
    if lib.bind(fd, ffi.cast("struct sockaddr *", sa), ffi.sizeof(sa[0])) < 0:
        raise fail(f"bind({addr}:{port})", fd)


def connect(fd: int, family: int, addr: str, port: int) -> None:
    sa = sockaddr(family, addr, port)
    if lib.connect(fd, ffi.cast("struct sockaddr *", sa), ffi.sizeof(sa[0])) < 0:
        raise fail(f"connect({addr}:{port})", fd)
