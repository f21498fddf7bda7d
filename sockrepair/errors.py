"""Every error sockrepair raises: a failed kernel call is a SocketCallError (an OSError with errno, the operation
and the socket in its message); everything else is a domain error under SockrepairError."""

from __future__ import annotations

import errno as _errno
import os


class SockrepairError(Exception):
    """Base of the domain errors; the CLI prints these as one line, never as a traceback."""


class SocketCallError(OSError):
    """A kernel call on a socket failed. `op` names the call (e.g. "setsockopt(TCP_REPAIR_WINDOW)"), `fd` the socket."""

    def __init__(self, err: int, op: str, fd: int | None = None, sock: str | None = None) -> None:
        where = sock if sock is not None else (f"fd {fd}" if fd is not None else "")
        msg = f"{op}{' on ' + where if where else ''}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        super().__init__(err, msg)
        self.op = op
        self.fd = fd

    def __str__(self) -> str:
        return str(self.strerror)


class UnsupportedError(SockrepairError):
    """This kernel or host lacks what the operation needs (TCP_REPAIR, CAP_NET_ADMIN, a tool)."""


class NotPermittedError(UnsupportedError):
    """The caller lacks CAP_NET_ADMIN in the socket's network namespace."""


class SocketStateError(SockrepairError):
    """The socket is not something that can be repaired: not TCP, listening, or in an unsupported TCP state."""


class RestoreError(SockrepairError):
    """A saved connection could not be put back; nothing of the half-made socket is left behind."""


class AddressInUseError(RestoreError):
    """Another socket already holds the connection's 4-tuple."""


class AddressNotLocalError(RestoreError):
    """The connection's local address is not configured on this host (or in this network namespace)."""


class ImageError(SockrepairError, ValueError):
    """A connection image is malformed: says what was wrong and at which byte."""


class LockError(SockrepairError):
    """The network lock could not be taken, renewed or released."""


class CriuError(SockrepairError):
    """criu is missing, incompatible, or failed; the message carries the cause and the fix when known."""
