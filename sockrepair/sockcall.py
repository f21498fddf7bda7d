"""Typed wrappers over libc's socket calls on raw fds: each failure becomes a SocketCallError naming the call."""

from __future__ import annotations

import errno
import socket
from typing import Any

from ._ffi import ffi, lib
from .errors import SocketCallError

SockLike = socket.socket | int


def fileno(sock: SockLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def fail(op: str, fd: int) -> SocketCallError:
    return SocketCallError(ffi.errno, op, fd)


def set_int(fd: int, level: int, opt: int, value: int, name: str) -> None:
    buf = ffi.new("int *", value)
    if lib.setsockopt(fd, level, opt, buf, 4) < 0:
        raise fail(f"setsockopt({name}={value})", fd)


def get_int(fd: int, level: int, opt: int, name: str) -> int:
    buf = ffi.new("int *")
    size = ffi.new("socklen_t *", 4)
    if lib.getsockopt(fd, level, opt, buf, size) < 0:
        raise fail(f"getsockopt({name})", fd)
    return int(buf[0])


def get_u32(fd: int, level: int, opt: int, name: str) -> int:
    """Sequence numbers and timestamps are u32 on the wire; reading them as int would turn half of them negative."""
    buf = ffi.new("uint32_t *")
    size = ffi.new("socklen_t *", 4)
    if lib.getsockopt(fd, level, opt, buf, size) < 0:
        raise fail(f"getsockopt({name})", fd)
    return int(buf[0])


def set_u32(fd: int, level: int, opt: int, value: int, name: str) -> None:
    buf = ffi.new("uint32_t *", value & 0xFFFFFFFF)
    if lib.setsockopt(fd, level, opt, buf, 4) < 0:
        raise fail(f"setsockopt({name}={value})", fd)


def get_struct(fd: int, level: int, opt: int, ctype: str, name: str) -> Any:
    buf = ffi.new(ctype + " *")
    size = ffi.new("socklen_t *", ffi.sizeof(ctype))
    if lib.getsockopt(fd, level, opt, buf, size) < 0:
        raise fail(f"getsockopt({name})", fd)
    return buf


def set_struct(fd: int, level: int, opt: int, buf: Any, name: str) -> None:
    if lib.setsockopt(fd, level, opt, buf, ffi.sizeof(buf[0])) < 0:
        raise fail(f"setsockopt({name})", fd)


def get_bytes(fd: int, level: int, opt: int, size: int, name: str) -> bytes:
    buf = ffi.new("char[]", size)
    length = ffi.new("socklen_t *", size)
    if lib.getsockopt(fd, level, opt, buf, length) < 0:
        raise fail(f"getsockopt({name})", fd)
    return ffi.buffer(buf, length[0])[:]


def set_bytes(fd: int, level: int, opt: int, value: bytes, name: str) -> None:
    if lib.setsockopt(fd, level, opt, value, len(value)) < 0:
        raise fail(f"setsockopt({name}={value!r})", fd)


def ioctl_int(fd: int, request: int, name: str) -> int:
    buf = ffi.new("int *")
    if lib.ioctl(fd, ffi.cast("unsigned long", request), buf) < 0:
        raise fail(f"ioctl({name})", fd)
    return int(buf[0])


def peek(fd: int, length: int, name: str) -> bytes:
    """Copy `length` bytes of the selected queue without consuming them; a short read means the queue changed."""
    if length == 0:
        return b""
    buf = ffi.new("char[]", length)
    got = lib.recv(fd, buf, length, lib.MSG_PEEK | lib.MSG_DONTWAIT)
    if got < 0:
        raise fail(f"recv(MSG_PEEK, {name})", fd)
    if got != length:
        raise SocketCallError(errno.EAGAIN, f"recv(MSG_PEEK, {name}) returned {got} of {length} bytes", fd)
    return ffi.buffer(buf, length)[:]


def send_chunked(fd: int, data: bytes | memoryview, name: str, chunk: int = 1 << 20) -> None:
    """Write all of `data` without blocking. The kernel refuses large repair-mode writes with ENOMEM (one skb per
    call), so a refused write is retried in halves down to one page before it counts as a failure."""
    view = memoryview(data)
    pos = 0
    flags = lib.MSG_DONTWAIT | lib.MSG_NOSIGNAL
    while pos < len(view):
        piece = view[pos : pos + chunk]
        sent = lib.send(fd, ffi.from_buffer(piece), len(piece), flags)
        if sent < 0:
            err = ffi.errno
            if err == errno.ENOMEM and chunk > 4096:
                chunk //= 2
                continue
            raise SocketCallError(err, f"send({name}, {len(piece)} bytes at offset {pos} of {len(view)})", fd)
        pos += sent
