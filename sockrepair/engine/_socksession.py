"""A session (engine/_session.py) that makes its int calls through the standard library instead of cffi.

getsockopt/setsockopt of an int go through the socket object's methods and int ioctls through fcntl.ioctl: the same
system calls with the same arguments, made from C, at about half the cost of a call through cffi's libffi (measured
here: 0.47 against 0.86 us of CPU for getsockopt, 0.50 against 1.13 us for an ioctl). A checkpoint makes some 60 such
calls and a restore some 25. Calls with structs (TCP_INFO, TCP_REPAIR_WINDOW, TCP_REPAIR_OPTIONS, sockaddrs) and
the queue transfers stay with cffi."""

from __future__ import annotations

import array
import contextlib
import socket
from collections.abc import Iterator, Sequence
from fcntl import ioctl as _ioctl

from sockrepair.engine._session import SockLike, _Session, signed32
from sockrepair.state import ConnTuple


class SocketSession(_Session):
    """A _Session over a socket object `sock`; failures are the same SocketCallError, with the same op text."""

    __slots__ = ("box", "sock")

    def __init__(self, sock: socket.socket, conn: ConnTuple | None = None) -> None:
        super().__init__(sock.fileno(), conn)
        self.sock = sock
        self.box = array.array("i", [0])

    def get(self, level: int, opt: int, name: str) -> int:
        try:
            return self.sock.getsockopt(level, opt)
        except OSError as exc:
            raise self.fail(f"getsockopt({name})", exc.errno) from None

    def set(self, level: int, opt: int, value: int, name: str) -> None:
        try:
            self.sock.setsockopt(level, opt, value)
        except OSError as exc:
            raise self.fail(f"setsockopt({name}={value})", exc.errno) from None

    def set_u32(self, level: int, opt: int, value: int, name: str) -> None:
        try:
            self.sock.setsockopt(level, opt, signed32(value))
        except OSError as exc:
            raise self.fail(f"setsockopt({name}={value})", exc.errno) from None

    def ioctl(self, request: int, name: str) -> int:
        box = self.box
        try:
            _ioctl(self.fd, request, box, True)
        except OSError as exc:
            raise self.fail(f"ioctl({name})", exc.errno) from None
        return box[0]


@contextlib.contextmanager
def sessions_of(socks: Sequence[SockLike]) -> Iterator[list[_Session]]:
    """A session per socket: a SocketSession for a socket object; for an fd, a SocketSession over a socket object
    made for the duration and detached (never closed) after, but only while no default timeout is set
    (socket.setdefaulttimeout: a socket object made then turns its fd non-blocking, and a pidfd_getfd copy shares
    that flag with the program it was taken from); a plain _Session otherwise."""
    wrap = socket.getdefaulttimeout() is None
    wrapped: list[socket.socket] = []
    sessions: list[_Session] = []
    try:
        for sock in socks:
            if isinstance(sock, socket.socket):
                sessions.append(SocketSession(sock))
            elif wrap and (made := _over(sock)) is not None:
                wrapped.append(made)
                sessions.append(SocketSession(made))
            else:
                sessions.append(_Session(sock))
        yield sessions
    finally:
        for sock in wrapped:
            sock.detach()


def _over(fd: int) -> socket.socket | None:
    """A socket object over `fd`; None when `fd` is not an open socket (the engine's own calls then say what it
    is). socket() checks it with a getsockname."""
    if fd < 0:
        return None
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    except OSError:
        return None
