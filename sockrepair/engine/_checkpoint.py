"""checkpoint / resume / discard: freeze an established socket in repair mode, read it, and let it go on or vanish.

Like libsoccr's pause/save/resume: checkpoint leaves the socket frozen, so the caller decides whether the connection
lives on here (resume) or elsewhere (discard, then restore the state)."""

from __future__ import annotations

import errno

from sockrepair.engine._addr import read_tuple
from sockrepair.engine._ffi import lib
from sockrepair.engine._queues import read_queues
from sockrepair.engine._repair import close_silently, repair_off, repair_on
from sockrepair.engine._sockcall import IntCalls, SockLike, fileno
from sockrepair.engine._sockopts import read_sockopts
from sockrepair.engine._tcpopts import (
    read_options,
    read_timestamp,
    read_window,
    tcp_info,
)
from sockrepair.errors import SocketCallError, SocketStateError
from sockrepair.state import TCP_ESTABLISHED, ConnectionState, state_name

SOL = lib.SOL_SOCKET

# Leaving repair mode resets the socket's reuse flag, and it cannot be read while in repair mode (which forces it):
# what the application had is remembered here between checkpoint and resume/discard.
_reuse_before_freeze: dict[int, bool] = {}


def ensure_unchanged(fd: int, state: ConnectionState) -> None:
    ioctl = IntCalls(fd).ioctl
    now = (ioctl(lib.SIOCOUTQ, "SIOCOUTQ"), ioctl(lib.SIOCOUTQNSD, "SIOCOUTQNSD"), ioctl(lib.SIOCINQ, "SIOCINQ"))
    saved = (len(state.send_queue), state.unsent_len, len(state.recv_queue))
    if now != saved:
        raise SocketStateError(
            f"fd {fd} ({state.tuple}) changed since its checkpoint (send queue / never sent / receive queue "
            f"{saved} -> {now}): it sent or received while frozen; hold the network lock across the move"
        )


def _ensure_tcp(fd: int, calls: IntCalls) -> None:
    get_int = calls.get
    try:
        sock_type = get_int(SOL, lib.SO_TYPE, "SO_TYPE")
    except SocketCallError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise SocketStateError(f"fd {fd} is not a socket") from None
        if exc.errno == errno.EBADF:
            raise SocketStateError(f"fd {fd} is not an open file descriptor") from None
        raise
    protocol = get_int(SOL, lib.SO_PROTOCOL, "SO_PROTOCOL")
    domain = get_int(SOL, lib.SO_DOMAIN, "SO_DOMAIN")
    if sock_type != lib.SOCK_STREAM or protocol != lib.IPPROTO_TCP or domain not in (lib.AF_INET, lib.AF_INET6):
        raise SocketStateError(
            f"fd {fd} is not a TCP socket (domain {domain}, type {sock_type}, protocol {protocol}); "
            "only IPv4/IPv6 TCP connections can be repaired"
        )


def checkpoint(sock: SockLike) -> ConnectionState:
    """Freeze `sock` (a socket.socket or a file descriptor number of an ESTABLISHED IPv4/IPv6 TCP socket; repair
    mode on) and return its full state (the kernel source of each field: ConnectionState). The socket stays frozen:
    follow with resume() to let it go on here, or discard() when the connection moves elsewhere. The kernel keeps
    acknowledging incoming data in repair mode: hold the network lock (sockrepair.lock()) from before the call.

    Raises SocketStateError (not a socket, not IPv4/IPv6 TCP, not ESTABLISHED), NotPermittedError (no CAP_NET_ADMIN
    in the socket's network namespace), UnsupportedError (a kernel without TCP_REPAIR), SocketCallError (any other
    failed call, `.op` naming it; EAGAIN when the queues kept changing under an unlocked peer). On an error after
    the freeze the socket is resumed."""
    fd = fileno(sock)
    calls = IntCalls(fd)
    _ensure_tcp(fd, calls)
    info = tcp_info(fd)
    if info.tcpi_state != TCP_ESTABLISHED:
        what = "a listening socket" if info.tcpi_state == lib.TCP_LISTEN else f"in state {state_name(info.tcpi_state)}"
        raise SocketStateError(f"fd {fd} is {what}; only ESTABLISHED connections can be checkpointed")
    conn = read_tuple(fd)
    sockopts = read_sockopts(fd, conn.family, calls)
    repair_on(fd, calls)
    _reuse_before_freeze[fd] = sockopts.reuseaddr
    try:
        # re-read under repair: the state may have moved between the first look and the freeze
        info = tcp_info(fd)
        if info.tcpi_state != TCP_ESTABLISHED:
            raise SocketStateError(
                f"fd {fd} left ESTABLISHED (now {state_name(info.tcpi_state)}) while it was being frozen"
            )
        options = read_options(fd, info, calls)
        timestamp = read_timestamp(fd, calls)
        window = read_window(fd)
        queues = read_queues(fd, calls)
    except BaseException:
        resume(fd)
        raise
    return ConnectionState(
        tuple=conn,
        tcp_state=info.tcpi_state,
        send_seq=queues.send_seq,
        recv_seq=queues.recv_seq,
        send_queue=queues.send_queue,
        unsent_len=queues.unsent_len,
        recv_queue=queues.recv_queue,
        options=options,
        window=window,
        timestamp=timestamp,
        sockopts=sockopts,
    )


def resume(sock: SockLike) -> None:
    """Leave repair mode without a window probe (TCP_REPAIR_OFF_NO_WP) and put back the application's SO_REUSEADDR:
    the connection goes on as if nothing happened. `sock` is a socket.socket or an fd number. Raises
    SocketCallError (e.g. EBADF)."""
    fd = fileno(sock)
    calls = IntCalls(fd)
    repair_off(fd, False, calls)
    if _reuse_before_freeze.pop(fd, False):
        calls.set(SOL, lib.SO_REUSEADDR, 1, "SO_REUSEADDR")


def discard(sock: SockLike, state: ConnectionState | None = None) -> None:
    """Close a frozen socket without FIN or RST: the connection now lives only in its saved state.

    Repair mode does not stop the kernel's timers: without the network lock a frozen socket can still send a
    probe or a retransmission, or take in an ACK, and then the saved state no longer matches what the peer knows.
    Given the `state` from checkpoint, discard refuses (and leaves the socket frozen) when the queues moved.

    `sock` is a socket.socket (closed through the object) or an fd number (closed with close(2)). Raises
    SocketStateError (the queues' lengths differ from `state`'s) or SocketCallError."""
    fd = fileno(sock)
    if state is not None:
        ensure_unchanged(fd, state)
    _reuse_before_freeze.pop(fd, None)
    if isinstance(sock, int):
        close_silently(fd)
    else:
        # closing through the object keeps Python from closing the fd number again later
        sock.close()
