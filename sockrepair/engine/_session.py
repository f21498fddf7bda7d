"""One socket under repair: the handle every engine step takes, like libsoccr's `struct libsoccr_sk`.

A checkpoint makes some 80 socket calls and a restore some 30, so what a call costs around the system call matters
as much as the call. A call through cffi's ABI mode (libffi) costs about 1 us here, twice what the kernel takes for
a getsockopt; the standard library's socket methods make the same call for about 0.45 us. So a session's calls go
through one `_socket.socket` wrapped around the fd (its constructor's one getsockname also tells an fd that is no
socket), which the session detaches when it goes away, so the fd is never closed by it. The calls still made through
cffi (the refusal checks' struct reads, a NULL option value or a zero option length, which the socket methods cannot
pass) share per-thread scratch buffers. The text of an error is only formatted once a call has failed.

What must outlive one call (the application's SO_REUSEADDR between checkpoint and resume/discard) is kept by the
socket's identity, its sockfs inode, never by its fd number: a number closed and handed to another socket must not
inherit the first socket's memory."""

from __future__ import annotations

import _socket
import errno
import os
import socket
import threading
from fcntl import ioctl as _fcntl_ioctl
from typing import Any

from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._pool import take
from sockrepair.errors import NotPermittedError, SocketCallError, UnsupportedError
from sockrepair.state import ConnTuple, Payload

SockLike = socket.socket | int

getsockopt = lib.getsockopt
setsockopt = lib.setsockopt
_close = lib.close
new = ffi.new
SOCKLEN_P = ffi.typeof("socklen_t *")
CHARS = ffi.typeof("char[]")
PEEK_FLAGS = lib.MSG_PEEK | lib.MSG_DONTWAIT
SEND_FLAGS = lib.MSG_DONTWAIT | lib.MSG_NOSIGNAL
TCP = lib.IPPROTO_TCP
AF_INET6 = lib.AF_INET6
WRAPPER_TYPE = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
TCP_REPAIR, TCP_REPAIR_QUEUE = lib.TCP_REPAIR, lib.TCP_REPAIR_QUEUE
REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_WP = lib.TCP_REPAIR_ON, lib.TCP_REPAIR_OFF, lib.TCP_REPAIR_OFF_NO_WP

# The inodes of frozen sockets whose application had SO_REUSEADDR set. Repair mode forces the reuse flag (so it
# cannot be read back) and leaving it clears the flag; resume puts it back from here. Only sockets with the flag
# are entered: one without it costs no fstat at checkpoint, nor at resume/discard while none with it is frozen.
# A socket closed while frozen (neither resumed nor discarded) stays entered, harmlessly: sockfs numbers its inodes
# from the kernel's shared 32-bit counter (get_next_ino), so no later socket gets the number for some 2**32 inodes.
_reuse_held: set[int] = set()


def fileno(sock: SockLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def signed32(value: int) -> int:
    """The C int holding the same 32 bits as the u32 `value` (sequence numbers and timestamps are u32 on the wire;
    the kernel reads them through an int)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


class _NoSocket:
    """In place of the socket object of an fd that is not an open socket (the constructor's getsockname failed):
    every call fails with the errno the kernel gave, as the call itself would."""

    __slots__ = ("errno",)

    def __init__(self, err: int) -> None:
        self.errno = err

    def _fail(self, *args: object) -> Any:
        raise OSError(self.errno, os.strerror(self.errno))

    getsockopt = setsockopt = getsockname = getpeername = recv = recv_into = send = _fail

    def detach(self) -> int:
        return -1


class _Scratch(threading.local):
    """Per thread (the kernel writes them while the GIL is released): the socklen_t of the cffi calls that pass a
    struct, and the int the ioctls write. Allocating them per session cost about as much as a call."""

    def __init__(self) -> None:
        self.size = new(SOCKLEN_P, 4)
        self.ibuf = bytearray(4)
        self.ival = memoryview(self.ibuf).cast("i")


_scratch = _Scratch()


class _Session:
    """The calls of one operation on one socket. `tuple` is the connection once known (restore knows it from the
    start, checkpoint once it has read it); failures carry it. Make one per operation and never share it between
    threads."""

    __slots__ = ("_getsockopt", "_setsockopt", "_wrapped", "fd", "sock", "tuple")

    def __init__(self, fd: int, conn: ConnTuple | None = None, owner: socket.socket | None = None,
                 lent: socket.socket | None = None) -> None:
        """`owner`: the socket object of `fd` when the engine made it (restore), whose methods the calls use; never
        a caller's, whose timeout would make its calls wait. `lent`: a caller's socket object of `fd` whose methods
        the calls may use (session_of() says when)."""
        self.fd = fd
        self.tuple = conn
        # The socket methods check no family, type or protocol for these calls: the kernel answers for the fd. The
        # family only sizes the address buffer of getsockname/getpeername, which decode what the kernel returns:
        # IPv6's holds an IPv4 address too. SOCK_NONBLOCK in the type makes the object's timeout 0: without it,
        # under socket.setdefaulttimeout() the constructor would set O_NONBLOCK on the application's fd, and every
        # call would wait in poll() first.
        sock: _socket.socket | _NoSocket
        self._wrapped = False
        if owner is not None and owner.gettimeout() is None:
            # the engine's own socket, which waits in no call: its methods serve, without a wrapper's getsockname
            sock = owner
        elif lent is not None and fd >= 0:
            sock = lent
        elif fd < 0:
            # the socket module refuses a negative fd (ValueError) where the kernel says EBADF
            sock = _NoSocket(errno.EBADF)
        else:
            try:
                sock = _socket.socket(AF_INET6, WRAPPER_TYPE, 0, fd)
                self._wrapped = True
            except OSError as exc:
                sock = _NoSocket(exc.errno or errno.ENOTSOCK)
        self.sock = sock
        self._getsockopt, self._setsockopt = sock.getsockopt, sock.setsockopt

    def __del__(self) -> None:
        # a socket object closes its fd when it goes away: a wrapper only borrowed it
        if self._wrapped:
            self.sock.detach()

    def fail(self, op: str, err: int | None = None) -> SocketCallError:
        """The error of the call `op` that just failed (errno from libc unless given)."""
        return SocketCallError(ffi.errno if err is None else err, op, self.fd, tuple=self.tuple)

    def failed(self, op: str, exc: OSError) -> SocketCallError:
        """The error of the call `op` that raised `exc` through the socket methods."""
        return SocketCallError(exc.errno or errno.EIO, op, self.fd, tuple=self.tuple)

    def get(self, level: int, opt: int, name: str) -> int:
        try:
            return self._getsockopt(level, opt)
        except OSError as exc:
            raise self.failed(f"getsockopt({name})", exc) from None

    def get_u32(self, level: int, opt: int, name: str) -> int:
        """Sequence numbers and timestamps are u32 on the wire; read as int, half of them would turn negative."""
        return self.get(level, opt, name) & 0xFFFFFFFF

    def set(self, level: int, opt: int, value: int, name: str) -> None:
        try:
            self._setsockopt(level, opt, value)
        except OSError as exc:
            raise self.failed(f"setsockopt({name}={value})", exc) from None

    def set_u32(self, level: int, opt: int, value: int, name: str) -> None:
        try:
            self._setsockopt(level, opt, signed32(value))
        except OSError as exc:
            raise self.failed(f"setsockopt({name}={value})", exc) from None

    def set_bytes(self, level: int, opt: int, value: bytes, name: str) -> None:
        try:
            self._setsockopt(level, opt, value)
        except OSError as exc:
            raise self.failed(f"setsockopt({name}={value!r})", exc) from None

    @property
    def size(self) -> Any:
        """A socklen_t * for a cffi call of this thread."""
        return _scratch.size

    def ioctl(self, request: int, name: str) -> int:
        scratch = _scratch
        try:
            _fcntl_ioctl(self.fd, request, scratch.ibuf, True)
        except OSError as exc:
            raise self.failed(f"ioctl({name})", exc) from None
        return scratch.ival[0]

    def repair_on(self) -> None:
        """TCP_REPAIR = 1. Raises NotPermittedError without CAP_NET_ADMIN in the socket's network namespace,
        UnsupportedError on a kernel without TCP_REPAIR, SocketCallError otherwise."""
        try:
            self.set(TCP, TCP_REPAIR, REPAIR_ON, "TCP_REPAIR")
        except SocketCallError as exc:
            if exc.errno == errno.EPERM:
                raise NotPermittedError(
                    f"TCP_REPAIR on fd {self.fd} refused: it needs CAP_NET_ADMIN in the socket's network namespace "
                    "(run as root, or grant the capability)", fd=self.fd
                ) from None
            if exc.errno == errno.ENOPROTOOPT:
                raise UnsupportedError("this kernel has no TCP_REPAIR (needs Linux >= 3.5 built with it)") from None
            raise

    def repair_off(self, probe: bool) -> None:
        """Leave repair mode. With `probe` the kernel sends a window probe, which makes the peer answer with an ACK
        and so retransmit at once whatever it sent while the connection was away; without it nothing goes on the
        wire (TCP_REPAIR_OFF_NO_WP)."""
        self.set(TCP, TCP_REPAIR, REPAIR_OFF if probe else REPAIR_OFF_NO_WP, "TCP_REPAIR")

    def select_queue(self, queue: int) -> None:
        """TCP_REPAIR_QUEUE: the queue that TCP_QUEUE_SEQ, send() and recv() address from now on."""
        self.set(TCP, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")

    def peek(self, length: int, name: str) -> Payload:
        """`length` bytes of the selected queue, read without consuming them; a short read means the queue changed
        (SocketCallError with EAGAIN). A queue of engine._pool's sizes is read into a buffer of the pool, already
        touched and in huge pages where the kernel gives them, and comes back as a read-only view of it; another
        into a new bytes object, which the kernel writes straight into (never zeroed first)."""
        if length == 0:
            return b""
        window = take(length)
        try:
            if window is None:
                data: Payload = self.sock.recv(length, PEEK_FLAGS)
                got = len(data)
            else:
                got = self.sock.recv_into(window, length, PEEK_FLAGS)
                data = window.toreadonly()
        except OSError as exc:
            raise self.failed(f"recv(MSG_PEEK, {name})", exc) from None
        if got != length:
            raise self.fail(f"recv(MSG_PEEK, {name}) returned {got} of {length} bytes", errno.EAGAIN)
        return data

    def send_all(self, data: bytes | memoryview, name: str, chunk: int = 1 << 20) -> None:
        """Write all of `data` without blocking. The kernel refuses large repair-mode writes with ENOMEM (one skb
        per call), so a refused write is retried in halves down to one page before it counts as a failure."""
        view = memoryview(data)
        send = self.sock.send
        pos = 0
        while pos < len(view):
            piece = view[pos : pos + chunk]
            try:
                pos += send(piece, SEND_FLAGS)
            except OSError as exc:
                if exc.errno == errno.ENOMEM and chunk > 4096:
                    chunk //= 2
                    continue
                raise self.failed(f"send({name}, {len(piece)} bytes at offset {pos} of {len(view)})", exc) from None


def session_of(sock: SockLike, conn: ConnTuple | None = None) -> _Session:
    """A session for a caller's socket object or fd. A plain socket.socket that never waits in a call (blocking,
    or non-blocking: no timeout to poll for first) lends its own methods, which spares the wrapper's getsockname; a
    subclass (ssl.SSLSocket's recv and send are TLS's) or one with a timeout gets a wrapper of its fd."""
    if type(sock) is socket.socket and sock.gettimeout() in (None, 0.0):
        return _Session(sock.fileno(), conn, lent=sock)
    return _Session(fileno(sock), conn)


def close_silently(fd: int) -> None:
    """close(2) a socket in repair mode: the kernel drops it without FIN or RST."""
    if _close(fd) < 0:
        raise SocketCallError(ffi.errno, "close", fd)


def hold_reuse(fd: int, inode: int | None = None) -> None:
    """Remember, past the checkpoint's session, that the application of socket `fd` (sockfs `inode`, when the caller
    read it) had SO_REUSEADDR set."""
    _reuse_held.add(os.fstat(fd).st_ino if inode is None else inode)


def release_reuse(fd: int) -> bool:
    """Forget what hold_reuse remembered for socket `fd`; whether it had. No system call while nothing is held."""
    if not _reuse_held:
        return False
    try:
        _reuse_held.remove(os.fstat(fd).st_ino)
    except KeyError:
        return False
    return True
