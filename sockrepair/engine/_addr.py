"""sockaddr conversions between the kernel's layouts and ConnTuple."""

from __future__ import annotations

import socket
import struct
from typing import Any

from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._session import _Session
from sockrepair.state import ConnTuple

AF_INET, AF_INET6 = lib.AF_INET, lib.AF_INET6
SOCKADDR_P = ffi.typeof("struct sockaddr *")
# struct sockaddr_in / sockaddr_in6 as bytes: the family in host order, the port in network order, zeroed padding,
# flow info and scope id.
SOCKADDR_IN = struct.Struct("=H2s4s8x")
SOCKADDR_IN6 = struct.Struct("=H2sI16sI")
_inet_pton = socket.inet_pton
_from_buffer = ffi.from_buffer


def read_tuple(session: _Session) -> ConnTuple:
    """getsockname and getpeername of the session's socket (the socket module's, which spell addresses as
    inet_ntop does)."""
    sock = session.sock
    try:
        local = sock.getsockname()
    except OSError as exc:
        raise session.failed("getsockname", exc) from None
    try:
        remote = sock.getpeername()
    except OSError as exc:
        raise session.failed("getpeername", exc) from None
    if not isinstance(local, tuple) or not isinstance(remote, tuple):
        raise ValueError(f"fd {session.fd} is not an IPv4 or IPv6 socket")
    return ConnTuple(AF_INET if len(local) == 2 else AF_INET6, local[0], local[1], remote[0], remote[1])


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
