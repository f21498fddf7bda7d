"""The connection's addresses: the 4-tuple of a socket (the socket module converts the kernel's sockaddr_in /
sockaddr_in6 to its address tuples; restore binds and connects through the socket module too)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from sockrepair.engine._ffi import lib
from sockrepair.engine._session import _Session
from sockrepair.state import ConnTuple

AF_INET, AF_INET6 = lib.AF_INET, lib.AF_INET6


# SO_PEERNAME takes no more room than the address needs (EINVAL otherwise): sizeof(sockaddr_in), sockaddr_in6
_SOCKADDR_SIZE = {AF_INET: 16, AF_INET6: 28}
# where the address starts in each: after sin_family and sin_port; after sin6_family, sin6_port and sin6_flowinfo
_ADDR_AT = {AF_INET: (4, 8), AF_INET6: (8, 24)}


def _address(session: _Session, call: Callable[[], Any], name: str) -> tuple[Any, ...]:
    """`call` is getsockname or getpeername of the session's socket; a non-tuple address is an AF_UNIX one."""
    try:
        address = call()
    except OSError as exc:
        raise session.failed(name, exc) from None
    if not isinstance(address, tuple):
        raise ValueError(f"fd {session.fd} is not an IPv4 or IPv6 socket")
    return address


def read_tuple(session: _Session, closed: bool = False) -> ConnTuple:
    """getsockname and getpeername of the session's socket (the socket module's, which spell addresses as
    inet_ntop does); `closed`: getsockopt(SO_PEERNAME) instead of getpeername, which says ENOTCONN in CLOSE while
    the socket still holds its peer (inet_getname, peer=2)."""
    sock = session.sock
    local = _address(session, sock.getsockname, "getsockname")
    family = AF_INET if len(local) == 2 else AF_INET6
    if closed:
        try:
            raw = sock.getsockopt(lib.SOL_SOCKET, lib.SO_PEERNAME, _SOCKADDR_SIZE[family])
        except OSError as exc:
            raise session.failed("getsockopt(SO_PEERNAME)", exc) from None
        start, stop = _ADDR_AT[family]
        return ConnTuple(family, local[0], local[1], socket.inet_ntop(family, raw[start:stop]),
                         int.from_bytes(raw[2:4], "big"))
    try:
        remote = sock.getpeername()
    except OSError as exc:
        raise session.failed("getpeername", exc) from None
    # the same family as the local address's: a tuple of the same length
    return ConnTuple(family, local[0], local[1], remote[0], remote[1])
