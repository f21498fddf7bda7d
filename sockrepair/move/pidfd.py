"""pidfd_open/pidfd_getfd: take a duplicate of another process's socket (Linux >= 5.6, ptrace access needed)."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

from sockrepair.engine._ffi import ffi, lib
from sockrepair.errors import ProcessError, refused_advice


def shared_socket(fd: int) -> socket.socket:
    """A socket object of `fd` that changes nothing on its open file, which another process shares (a program's
    socket, or a restored one handed to a program): socket.socket(fileno=fd) sets O_NONBLOCK there when this
    process called socket.setdefaulttimeout() (a guard inherits it over its fork), and a program's blocking recv()
    then fails with EAGAIN. SOCK_NONBLOCK in the type keeps the constructor off the flags; the object's own timeout
    is 0. Family and protocol are read from the fd. Raises OSError when `fd` is not a socket."""
    return socket.socket(type=socket.SOCK_STREAM | socket.SOCK_NONBLOCK, fileno=fd)


class PidFd:
    """A handle on a process that stays valid (and refers to the same process) even if the pid is reused."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        fd = lib.syscall(lib.SYS_pidfd_open, ffi.cast("int", pid), ffi.cast("unsigned int", 0))
        if fd < 0:
            err = ffi.errno
            if err == errno.ESRCH:
                raise ProcessError(f"no such process: {pid}", pid=pid)
            if err == errno.ENOSYS:
                raise ProcessError("this kernel has no pidfd_open (needs Linux >= 5.3)", pid=pid)
            raise ProcessError(f"pidfd_open({pid}): {os.strerror(err)}", pid=pid)
        self.fd = int(fd)

    def getfd(self, target_fd: int) -> int:
        """A new fd in this process for the target's `target_fd` (the same open socket, not a copy of it).
        Raises ProcessError naming the target's pid and `target_fd`."""
        fd = self.getfd_if_open(target_fd)
        if fd is None:
            raise ProcessError(f"process {self.pid} has no fd {target_fd}", pid=self.pid, fd=target_fd)
        return fd

    def getfd_if_open(self, target_fd: int) -> int | None:
        """getfd(), or None when the target has no `target_fd` (closed since it was listed, say). Raises
        ProcessError for every other failure."""
        fd = lib.syscall(lib.SYS_pidfd_getfd, ffi.cast("int", self.fd), ffi.cast("int", target_fd),
                         ffi.cast("unsigned int", 0))
        if fd >= 0:
            return int(fd)
        err = ffi.errno
        if err == errno.EBADF:
            return None
        if err == errno.ESRCH:
            raise ProcessError(f"process {self.pid} exited", pid=self.pid)
        if err == errno.EPERM:
            raise ProcessError(f"not permitted to take fds from process {self.pid} (needs ptrace access: "
                               f"{refused_advice('run as root')})", pid=self.pid, fd=target_fd)
        if err == errno.ENOSYS:
            raise ProcessError("this kernel has no pidfd_getfd (needs Linux >= 5.6)", pid=self.pid)
        raise ProcessError(f"pidfd_getfd({self.pid}, {target_fd}): {os.strerror(err)}", pid=self.pid, fd=target_fd)

    def getfd_if_same(self, target_fd: int, inode: int) -> int | None:
        """getfd_if_open(), or None as well when `target_fd` holds another file than inode `inode` now (closed
        since it was listed, its number given to another). Raises ProcessError for every other failure."""
        fd = self.getfd_if_open(target_fd)
        if fd is None:
            return None
        try:
            same = os.fstat(fd).st_ino == inode
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            return None
        return fd

    def getfds(self, targets: Sequence[int]) -> list[int]:
        """getfd() of each of `targets` in order, up to the first that fails (the list is then shorter: getfd()
        says why); a loop with its arguments converted once, for the 1,000 fds a move takes under the freeze."""
        call, cast, number = lib.syscall, ffi.cast, lib.SYS_pidfd_getfd
        pidfd, flags = cast("int", self.fd), cast("unsigned int", 0)
        out: list[int] = []
        try:
            for target in targets:
                fd = call(number, pidfd, cast("int", target), flags)
                if fd < 0:
                    break
                out.append(int(fd))
        except BaseException:
            # an interrupt (Ctrl-C) between two calls: the copies taken so far would be nobody's to close, and would
            # hold the program's sockets open after its exit
            for fd in out:
                os.close(fd)
            raise
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PidFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
