"""restore: build a live socket from a ConnectionState without a handshake, in the order the kernel demands."""

from __future__ import annotations

import errno
import socket

from sockrepair.engine._addr import bind, connect
from sockrepair.engine._queues import refill_in_repair, set_sequences, write_unsent
from sockrepair.engine._repair import repair_off, repair_on
from sockrepair.engine._sockcall import IntCalls
from sockrepair.engine._sockopts import (
    apply_after_repair,
    apply_in_repair,
    apply_pre_bind,
    size_buffers,
)
from sockrepair.engine._tcpopts import (
    restore_options,
    restore_timestamp,
    restore_window,
    set_user_mss,
)
from sockrepair.errors import AddressInUseError, AddressNotLocalError, SocketCallError
from sockrepair.state import ConnectionState

MAX_USER_MSS = 32767


def restore(state: ConnectionState) -> socket.socket:
    """A live socket.socket (blocking, owned by the caller) with the saved 4-tuple, queues and options, repair mode
    off; the kernel sends a window probe, so the peer resends at once what the lock held off. On failure nothing is
    left: the half-made socket is closed while still in repair mode, so the peer sees nothing.

    Raises AddressNotLocalError (EADDRNOTAVAIL: the local address is not on this host or in this namespace),
    AddressInUseError (EADDRINUSE: another socket holds the 4-tuple, or the local port without reuse),
    NotPermittedError (no CAP_NET_ADMIN in the current network namespace), UnsupportedError (no TCP_REPAIR), or
    SocketCallError for any other refused call (e.g. setsockopt(TCP_REPAIR_WINDOW) EINVAL); all are OSError."""
    conn = state.tuple
    sock = socket.socket(conn.family, socket.SOCK_STREAM)
    fd = sock.fileno()
    calls = IntCalls(fd)
    so, options = state.sockopts, state.options
    send_len, recv_len = len(state.send_queue), len(state.recv_queue)
    # views, not copies: the queues may be large, and the kernel copies them anyway
    send_queue, sent_len = memoryview(state.send_queue), send_len - state.unsent_len
    try:
        repair_on(fd, calls)
        apply_pre_bind(fd, conn.family, so, calls)
        size_buffers(fd, so, send_len, recv_len, calls)
        _bind(fd, state)
        set_sequences(fd, state.send_seq, send_len, state.recv_seq, recv_len, calls)
        # The repair-mode connect sizes segments from the MSS clamp it sees then; TCP_REPAIR_OPTIONS sets the clamp
        # later without resizing, which left restored sockets sending 524-byte segments. A user MSS set before
        # the connect is the clamp the connect uses (the kernel caps it at MAX_TCP_WINDOW, so loopback's 65495
        # becomes 32767); it is cleared again once the connection exists.
        set_user_mss(fd, min(options.mss, MAX_USER_MSS), calls)
        _connect(fd, state)
        set_user_mss(fd, 0, calls)
        restore_options(fd, options)
        if options.timestamps:
            restore_timestamp(fd, state.timestamp, calls)
        refill_in_repair(fd, state.recv_queue, send_queue[:sent_len], calls)
        if state.window is not None:
            # before repair off: writing never-sent data before the window is in place has hung connections (passt)
            restore_window(fd, state.window)
        apply_in_repair(fd, conn.family, so, calls)
        repair_off(fd, True, calls)
        write_unsent(fd, send_queue[sent_len:])
        apply_after_repair(fd, so, calls)
    except BaseException:
        _abandon(sock)
        raise
    return sock


def _abandon(sock: socket.socket) -> None:
    try:
        repair_on(sock.fileno())
    finally:
        sock.close()


def _bind(fd: int, state: ConnectionState) -> None:
    conn = state.tuple
    try:
        bind(fd, conn.family, conn.local_addr, conn.local_port)
    except SocketCallError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AddressNotLocalError(
                f"cannot restore {conn}: local address {conn.local_addr} is not configured on this host "
                "(or in this network namespace)"
            ) from None
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"cannot restore {conn}: local address {conn.local_addr}:{conn.local_port} "
                                    "is held by a socket that does not allow reuse") from None
        raise


def _connect(fd: int, state: ConnectionState) -> None:
    conn = state.tuple
    try:
        connect(fd, conn.family, conn.remote_addr, conn.remote_port)
    except SocketCallError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            raise AddressInUseError(
                f"cannot restore {conn}: another socket already holds this 4-tuple (close or discard it first)"
            ) from None
        raise
