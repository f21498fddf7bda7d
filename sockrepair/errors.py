"""Every error sockrepair raises, in one tree under SockrepairError.

Errors that carry an errno are also OSError (with `.errno` set), so `except OSError` around restore() works as it does
around bind(): SocketCallError for any failed kernel call, AddressInUseError (EADDRINUSE), AddressNotLocalError
(EADDRNOTAVAIL), NotPermittedError (a PermissionError, EPERM) and NftError. Image errors are also ValueError.

Fields a caller branches on are attributes, None when not known: `fd` (a file descriptor in the process that raised,
or in `pid` when that is set), `pid`, `tuple` (a ConnTuple), `tcp_state` (the kernel's TCP state number), `op` (the
kernel call), and for images `path`, `offset` (bytes from the start) and `field` (the record path, e.g.
"window.snd_wnd")."""

from __future__ import annotations

import errno as _errno
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sockrepair.state import ConnTuple

# Past this many characters, input quoted in a message shows only its start and its length (shown()).
ECHO_LIMIT = 120


# What a refusal root meets too means: running as root again would not change it.
REFUSED_TO_ROOT = "refused to root too: another user namespace or a security module keeps it out of this process's reach"


def refused_advice(as_user: str) -> str:
    """What to say about a permission the kernel refused: `as_user` (what root would be allowed) to anyone but root,
    REFUSED_TO_ROOT to root."""
    return REFUSED_TO_ROOT if os.geteuid() == 0 else as_user


def shown(text: str) -> str:
    """`text` (a user's argument, or a value read from a file) as an error message quotes it: its repr(); past
    ECHO_LIMIT characters the repr of its first 100 and its length, so that the message stays one readable line."""
    return repr(text) if len(text) <= ECHO_LIMIT else repr(text[:100]) + f"... ({len(text)} characters)"


class SockrepairError(Exception):
    """The root of every error sockrepair raises; the CLI prints these as one line, never as a traceback. Every one
    pickles with its message, errno and fields (it can cross a multiprocessing pipe)."""

    def __reduce__(self) -> tuple[Any, ...]:
        # The subclasses' __init__ signatures differ from their args (and from one another): rebuild from the parts.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[SockrepairError], args: tuple[Any, ...], fields: dict[str, Any]) -> SockrepairError:
    exc = cls.__new__(cls, *args)
    (OSError if issubclass(cls, OSError) else Exception).__init__(exc, *args)
    exc.__dict__.update(fields)
    return exc


class _WithErrno(SockrepairError, OSError):
    """A domain error that is also an OSError: `.errno` is set and str() is the message alone."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class SocketCallError(_WithErrno):
    """A kernel call on a socket failed: `.errno`, `.op` (e.g. "setsockopt(TCP_REPAIR_WINDOW)"), `.fd`, and `.tuple`
    when the connection is known. `sock`, when given, is how the message names the socket instead of "fd N"."""

    def __init__(self, err: int, op: str, fd: int | None = None, sock: str | None = None, *,
                 tuple: ConnTuple | None = None) -> None:
        where = sock if sock is not None else (f"fd {fd}" if fd is not None else "")
        msg = f"{op}{' on ' + where if where else ''}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        super().__init__(err, msg)
        self.op = op
        self.fd = fd
        self.tuple = tuple


class UnsupportedError(SockrepairError):
    """This kernel or host lacks what the operation needs (TCP_REPAIR, a kernel feature, a tool)."""


class NotPermittedError(UnsupportedError, PermissionError):
    """The caller lacks CAP_NET_ADMIN (or ptrace access) where the operation needs it; `.errno` is EPERM."""

    def __init__(self, message: str, *, fd: int | None = None, pid: int | None = None) -> None:
        PermissionError.__init__(self, _errno.EPERM, message)
        self.fd = fd
        self.pid = pid

    def __str__(self) -> str:
        return str(self.strerror)


class SocketStateError(SockrepairError):
    """The socket cannot be repaired as it is: not TCP, listening, in a state the engine does not take, or changed
    since its checkpoint. `.fd`, `.pid` (None: this process), `.tuple`, `.tcp_state`."""

    def __init__(self, message: str, *, fd: int | None = None, pid: int | None = None,
                 tuple: ConnTuple | None = None, tcp_state: int | None = None) -> None:
        super().__init__(message)
        self.fd = fd
        self.pid = pid
        self.tuple = tuple
        self.tcp_state = tcp_state


class RestoreError(SockrepairError):
    """A saved connection could not be put back; nothing of the half-made socket is left behind. `.tuple`."""

    def __init__(self, message: str, *, tuple: ConnTuple | None = None) -> None:
        super().__init__(message)
        self.tuple = tuple


class _RestoreErrno(RestoreError, OSError):
    ERRNO = 0

    def __init__(self, message: str, *, tuple: ConnTuple | None = None) -> None:
        OSError.__init__(self, self.ERRNO, message)
        self.tuple = tuple

    def __str__(self) -> str:
        return str(self.strerror)


class AddressInUseError(_RestoreErrno):
    """Another socket already holds the connection's 4-tuple, or its local port without reuse; `.errno` is
    EADDRINUSE."""

    ERRNO = _errno.EADDRINUSE


class AddressNotLocalError(_RestoreErrno):
    """The connection's local address is not configured on this host (or in this network namespace); `.errno` is
    EADDRNOTAVAIL."""

    ERRNO = _errno.EADDRNOTAVAIL


class ImageError(SockrepairError, ValueError):
    """An image (sockrepair's, its index, or criu's) is malformed or unreadable: the message says what and where;
    `.path` the file, `.offset` the byte, `.field` the record path, each None when not known."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.field = field


class LockError(SockrepairError):
    """The network lock could not be taken, renewed, listed or released: a bad argument (an item without a
    ConnTuple, a ttl outside (0, 3600] seconds, an unknown namespace), a Locker used across fork(), a table of another
    layout; NftError when the kernel refused a message."""


class NftError(LockError, OSError):
    """The kernel refused an nf_tables operation: `.errno` of the first failing message (EPERM: no CAP_NET_ADMIN in
    the namespace), `.op` names it (e.g. "add 1 element(s) of set inet sockrepair conn4"); `detail` is the kernel's
    extended-ACK text or a hint, appended to the message."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        if err == _errno.EPERM and not detail:
            detail = "needs CAP_NET_ADMIN in the network namespace"
        extra = f" ({detail})" if detail else ""
        OSError.__init__(self, err, f"{op}: {os.strerror(err)} [{_errno.errorcode.get(err, err)}]{extra}")
        self.op = op

    def __str__(self) -> str:
        return str(self.strerror)


class ProcessError(SockrepairError):
    """A process cannot be inspected or captured (gone, not permitted, or not holding what was asked for): `.pid`,
    and `.fd` (the process's own descriptor number) when one socket is meant."""

    def __init__(self, message: str, *, pid: int | None = None, fd: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.fd = fd


class NetnsError(SockrepairError):
    """A network namespace could not be created, entered or deleted: `.name` when it has one."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class HandoffError(SockrepairError):
    """Restored connections could not be handed to the program meant to take them."""


class WireError(SockrepairError):
    """A capture could not be taken, written or read."""


class CriuError(SockrepairError):
    """criu is missing, incompatible, or failed; the message carries the cause and the fix when known."""


class BenchmarkError(SockrepairError):
    """A benchmark could not measure what it was asked to: its traced or timed run failed, or what it wrote could
    not be read. `.part` names the measurement (e.g. "syscalls", sockrepair/bench/syscalls.py)."""

    def __init__(self, message: str, *, part: str | None = None) -> None:
        super().__init__(message)
        self.part = part
