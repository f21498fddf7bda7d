"""Typed wrappers over libc's socket calls on raw fds: each failure becomes a SocketCallError naming the call.

A checkpoint makes some 40 of these calls and a restore some 20, so what a wrapper costs around the system call
matters as much as the call: libc's functions and the cdata types are looked up once here, int-valued calls of one
operation share one pair of buffers (IntCalls; allocating cdata costs about as much as the call), and the text of an
error is only formatted once a call has failed."""

from __future__ import annotations

import errno
import socket

from sockrepair.engine._ffi import ffi, lib
from sockrepair.errors import SocketCallError

SockLike = socket.socket | int

getsockopt = lib.getsockopt
setsockopt = lib.setsockopt
ioctl = lib.ioctl
_recv = lib.recv
_send = lib.send
new = ffi.new
# Buffers that the kernel fills at once need no zeroing first: that would touch every page of a big queue twice.
new_unzeroed = ffi.new_allocator(should_clear_after_alloc=False)
INT_P = ffi.typeof("int *")
SOCKLEN_P = ffi.typeof("socklen_t *")
CHARS = ffi.typeof("char[]")
PEEK_FLAGS = lib.MSG_PEEK | lib.MSG_DONTWAIT
SEND_FLAGS = lib.MSG_DONTWAIT | lib.MSG_NOSIGNAL


def fileno(sock: SockLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def fail(op: str, fd: int) -> SocketCallError:
    return SocketCallError(ffi.errno, op, fd)


def signed32(value: int) -> int:
    """The C int holding the same 32 bits as the u32 `value` (sequence numbers and timestamps are u32 on the wire;
    the kernel reads them through an int)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


class IntCalls:
    """The int-valued calls of one operation on one fd, through one pair of cdata buffers. Make one per operation,
    never share it between threads: the buffers are written while the GIL is released."""

    __slots__ = ("fd", "value", "size")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.value = new(INT_P)
        self.size = new(SOCKLEN_P, 4)

    def get(self, level: int, opt: int, name: str) -> int:
        size = self.size
        size[0] = 4
        if getsockopt(self.fd, level, opt, self.value, size) < 0:
            raise fail(f"getsockopt({name})", self.fd)
        return self.value[0]  # type: ignore[no-any-return]

    def get_u32(self, level: int, opt: int, name: str) -> int:
        """Sequence numbers and timestamps are u32 on the wire; read as int, half of them would turn negative."""
        return self.get(level, opt, name) & 0xFFFFFFFF

    def set(self, level: int, opt: int, value: int, name: str) -> None:
        buf = self.value
        buf[0] = value
        if setsockopt(self.fd, level, opt, buf, 4) < 0:
            raise fail(f"setsockopt({name}={value})", self.fd)

    def set_u32(self, level: int, opt: int, value: int, name: str) -> None:
        buf = self.value
        buf[0] = signed32(value)
        if setsockopt(self.fd, level, opt, buf, 4) < 0:
            raise fail(f"setsockopt({name}={value})", self.fd)

    def ioctl(self, request: int, name: str) -> int:
        if ioctl(self.fd, request, self.value) < 0:
            raise fail(f"ioctl({name})", self.fd)
        return self.value[0]  # type: ignore[no-any-return]


def set_int(fd: int, level: int, opt: int, value: int, name: str) -> None:
    IntCalls(fd).set(level, opt, value, name)


def get_int(fd: int, level: int, opt: int, name: str) -> int:
    return IntCalls(fd).get(level, opt, name)


def get_u32(fd: int, level: int, opt: int, name: str) -> int:
    return IntCalls(fd).get_u32(level, opt, name)


def set_u32(fd: int, level: int, opt: int, value: int, name: str) -> None:
    IntCalls(fd).set_u32(level, opt, value, name)


def ioctl_int(fd: int, request: int, name: str) -> int:
    return IntCalls(fd).ioctl(request, name)


def set_bytes(fd: int, level: int, opt: int, value: bytes, name: str) -> None:
    if setsockopt(fd, level, opt, value, len(value)) < 0:
        raise fail(f"setsockopt({name}={value!r})", fd)


def peek(fd: int, length: int, name: str) -> bytes:
    """Copy `length` bytes of the selected queue without consuming them; a short read means the queue changed.
    The kernel writes into an unzeroed buffer, which is copied once into the bytes returned."""
    if length == 0:
        return b""
    buf = new_unzeroed(CHARS, length)
    got = _recv(fd, buf, length, PEEK_FLAGS)
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
    while pos < len(view):
        piece = view[pos : pos + chunk]
        sent = _send(fd, ffi.from_buffer(piece), len(piece), SEND_FLAGS)
        if sent < 0:
            err = ffi.errno
            if err == errno.ENOMEM and chunk > 4096:
                chunk //= 2
                continue
            raise SocketCallError(err, f"send({name}, {len(piece)} bytes at offset {pos} of {len(view)})", fd)
        pos += sent
