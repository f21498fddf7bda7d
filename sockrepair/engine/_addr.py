"""sockaddr conversions between the kernel's layouts and ConnTuple."""

from __future__ import annotations

import socket
import struct
from typing import Any

from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._session import _Session, getsockopt, new
from sockrepair.state import ConnTuple

AF_INET, AF_INET6 = lib.AF_INET, lib.AF_INET6
SOCKADDR_P = ffi.typeof("struct sockaddr *")
STORAGE_P = ffi.typeof("struct sockaddr_storage *")
STORAGE_SIZE = ffi.sizeof("struct sockaddr_storage")
# struct sockaddr_in / sockaddr_in6 as bytes: the family in host order, the port in network order, zeroed padding,
# flow info and scope id.
SOCKADDR_IN = struct.Struct("=H2s4s8x")
SOCKADDR_IN6 = struct.Struct("=H2sI16sI")
_inet_ntop, _inet_pton = socket.inet_ntop, socket.inet_pton
_from_buffer = ffi.from_buffer


def _decode(raw: bytes) -> tuple[int, str, int]:
    """(family, address, port) of a struct sockaddr_in or sockaddr_in6 given as its bytes."""
    family = raw[0] | raw[1] << 8
    if family == AF_INET:
        return family, _inet_ntop(AF_INET, raw[4:8]), raw[2] << 8 | raw[3]
    if family == AF_INET6:
        return family, _inet_ntop(AF_INET6, raw[8:24]), raw[2] << 8 | raw[3]
    raise ValueError(f"address family {family} is not IPv4 or IPv6")


def read_tuple(session: _Session, closed: bool = False) -> ConnTuple:
    """getsockname and getpeername of the session's socket; `closed`: getsockopt(SO_PEERNAME) instead of
    getpeername, which says ENOTCONN in CLOSE while the socket still holds its peer (inet_getname, peer=2)."""
    fd, size = session.fd, session.size
    sa = new(STORAGE_P)
    as_sockaddr = ffi.cast(SOCKADDR_P, sa)
    size[0] = STORAGE_SIZE
    if lib.getsockname(fd, as_sockaddr, size) < 0:
        raise session.fail("getsockname")
    family, laddr, lport = _decode(ffi.buffer(sa, 28)[:])
    # SO_PEERNAME takes no more room than the address needs (EINVAL otherwise): the local one's size
    size[0] = STORAGE_SIZE if not closed else SOCKADDR_IN.size if family == AF_INET else SOCKADDR_IN6.size
    if closed:
        if getsockopt(fd, lib.SOL_SOCKET, lib.SO_PEERNAME, sa, size) < 0:
            raise session.fail("getsockopt(SO_PEERNAME)")
    elif lib.getpeername(fd, as_sockaddr, size) < 0:
        raise session.fail("getpeername")
    _, raddr, rport = _decode(ffi.buffer(sa, 28)[:])
    return ConnTuple(family, laddr, lport, raddr, rport)


def sockaddr(family: int, addr: str, port: int) -> Any:
    """A struct sockaddr_in/sockaddr_in6 for bind/connect, as a char array of its exact size over packed bytes;
    callers cast it in the call so that it stays alive."""
    if family == AF_INET:
        return _from_buffer(SOCKADDR_IN.pack(family, port.to_bytes(2, "big"), _inet_pton(AF_INET, addr)))
    return _from_buffer(SOCKADDR_IN6.pack(family, port.to_bytes(2, "big"), 0, _inet_pton(AF_INET6, addr), 0))


def bind(session: _Session, family: int, addr: str, port: int) -> None:
    sa = sockaddr(family, addr, port)
    if lib.bind(session.fd, ffi.cast(SOCKADDR_P, sa), len(sa)) < 0:
        raise session.fail(f"bind({addr}:{port})")


def connect(session: _Session, family: int, addr: str, port: int) -> None:
    sa = sockaddr(family, addr, port)
    if lib.connect(session.fd, ffi.cast(SOCKADDR_P, sa), len(sa)) < 0:
        raise session.fail(f"connect({addr}:{port})")
