"""struct tcp_info (linux/tcp.h; TCP_INFO and sock_diag's INET_DIAG_INFO) read by field name: where each field lies
comes from its one declaration, engine/decl/tcp_info.h, laid out by cffi.

The kernel copies min(asked, its own size) bytes (do_tcp_getsockopt, net/ipv4/tcp.c), so a view asks for its
`.size` and nothing past its last field, and an older kernel, whose struct ends earlier, answers short."""

from __future__ import annotations

import errno
import functools
import socket
import struct

from sockrepair.engine._ffi import ffi
from sockrepair.errors import SocketCallError

_LAYOUT = dict(ffi.typeof("struct tcp_info").fields)
_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def offset(field: str) -> int:
    """Byte offset of `field` (e.g. "tcpi_segs_out") in struct tcp_info. Raises ValueError for a name it lacks."""
    try:
        return int(_LAYOUT[field].offset)
    except KeyError:
        raise ValueError(f"struct tcp_info has no field {field!r} (engine/decl/tcp_info.h: Linux 6.7's)") from None


@functools.cache
def view(*fields: str) -> struct.Struct:
    """A struct.Struct that unpacks `fields`, named in the order they lie in struct tcp_info, from its bytes (native
    byte order, unsigned); its size ends with the last field. Raises ValueError for no field, a field it lacks, or
    fields out of order or named twice."""
    if not fields:
        raise ValueError("struct tcp_info: no field named")
    twice = [name for i, name in enumerate(fields) if name in fields[:i]]
    if twice:
        raise ValueError(f"struct tcp_info: {twice[0]} named twice")
    parts, end = ["="], 0
    for name in fields:
        at = offset(name)
        if at < end:
            raise ValueError(f"struct tcp_info: {name} lies before the field named ahead of it")
        size = ffi.sizeof(_LAYOUT[name].type)
        parts.append(f"{at - end}x{_FORMATS[size]}")
        end = at + size
    return struct.Struct("".join(parts))


def read(sock: socket.socket, *fields: str) -> tuple[int, ...]:
    """`fields` of `sock`'s TCP_INFO (see view()), in that order. Raises SocketCallError: the getsockopt's errno,
    or EPROTO when this kernel's struct tcp_info ends before the last field; ValueError as view() does."""
    layout = view(*fields)
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, layout.size)
    except OSError as exc:
        raise SocketCallError(exc.errno or errno.EIO, "getsockopt(TCP_INFO)", sock.fileno()) from None
    if len(raw) < layout.size:
        raise SocketCallError(errno.EPROTO, f"getsockopt(TCP_INFO) for {fields[-1]}", sock.fileno())
    return layout.unpack_from(raw)
