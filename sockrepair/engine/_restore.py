"""restore: build a live socket from a ConnectionState without a handshake, in the order the kernel demands."""

from __future__ import annotations

import dataclasses
import errno
import socket

from sockrepair.engine._addr import bind, connect
from sockrepair.engine._queues import refill_in_repair, set_sequences, write_unsent
from sockrepair.engine._session import _Session
from sockrepair.engine._sockopts import (
    apply_after_repair,
    apply_in_repair,
    apply_pre_bind,
    lift_send_limit,
    size_buffers,
)
from sockrepair.engine._socksession import SocketSession
from sockrepair.engine._states import FIN_IN_RECV, SYN_SENT, replay_close, restore_seqs
from sockrepair.engine._tcpopts import (
    restore_options,
    restore_timestamp,
    restore_window,
    resync_mss,
    set_user_mss,
)
from sockrepair.errors import AddressInUseError, AddressNotLocalError, SocketCallError
from sockrepair.state import TCP_ESTABLISHED, ConnectionState

MAX_USER_MSS = 32767  # MAX_TCP_WINDOW: the largest TCP_MAXSEG the kernel takes
MIN_USER_MSS = 88  # TCP_MIN_MSS: the smallest
MSS_DEFAULT = 536  # TCP_MSS_DEFAULT: tcp_bound_to_half_wnd halves only windows larger than this
TIMESTAMP_OPTION = 12  # TCPOLEN_TSTAMP_ALIGNED


def restore(state: ConnectionState) -> socket.socket:
    """A live socket (blocking, in this process and network namespace) with the saved 4-tuple, sequence numbers,
    queues and options, repair mode off; no handshake goes on the wire, only a window probe that the peer answers
    with an ACK. `state` is what checkpoint() returned (or an image of it) and is not changed; the socket of the
    checkpoint must be gone (discard) or the 4-tuple is taken. The steps, in the kernel's order, are listed in
    sockrepair.engine: TCP_REPAIR, SO_SNDBUFFORCE / SO_RCVBUFFORCE, bind, TCP_QUEUE_SEQ, TCP_MAXSEG around the
    repair-mode connect, TCP_REPAIR_OPTIONS, TCP_TIMESTAMP, the queues written with TCP_REPAIR_QUEUE selected,
    TCP_REPAIR_WINDOW (struct tcp_repair_window), the options, TCP_REPAIR_OFF, the never-sent bytes, SO_REUSEADDR.

    Raises AddressNotLocalError (EADDRNOTAVAIL) when the local address is not configured in this network namespace;
    AddressInUseError (EADDRINUSE) when another socket holds the 4-tuple, or the local port without allowing reuse;
    NotPermittedError (a PermissionError) without CAP_NET_ADMIN; UnsupportedError on a kernel without TCP_REPAIR;
    SocketCallError (`.errno`, `.op`, `.fd`, `.tuple`) when another kernel call fails, e.g. ENOENT when the
    congestion control is not available on this host; OSError from socket(2) itself (EMFILE). The address errors
    and SocketCallError carry the connection as `.tuple`. On failure nothing is left: the half-made socket is closed
    while still in repair mode, so the peer sees nothing."""
    conn = state.tuple
    sock = socket.socket(conn.family, socket.SOCK_STREAM)
    session = SocketSession(sock, conn)
    so, options = state.sockopts, state.options
    send_len, recv_len = len(state.send_queue), len(state.recv_queue)
    # views, not copies: the queues may be large, and the kernel copies them anyway
    send_queue, sent_len = memoryview(state.send_queue), send_len - state.unsent_len
    try:
        session.repair_on()
        apply_pre_bind(session, conn.family, so)
        size_buffers(session, so, send_len, recv_len)
        _bind(session, state)
        send_seq, recv_seq = restore_seqs(state)
        set_sequences(session, send_seq, send_len, recv_seq, recv_len)
        # The repair-mode connect sizes segments from the MSS clamp it sees then; TCP_REPAIR_OPTIONS sets the clamp
        # later without resizing, which left restored sockets sending 524-byte segments. A user MSS set before
        # the connect is the clamp the connect uses (the kernel caps it at MAX_TCP_WINDOW, so loopback's 65495
        # becomes 32767); it is cleared again once the connection exists.
        if state.tcp_state == SYN_SENT:
            _connect_again(sock, session, state)
            apply_in_repair(session, conn.family, so)
            session.repair_off(False)
            apply_after_repair(session, so)
            return sock
        set_user_mss(session, _user_mss(state))
        _connect(session, state)
        set_user_mss(session, 0)
        restore_options(session, options)
        if options.timestamps:
            restore_timestamp(session, state.timestamp)
        refill_in_repair(session, state.recv_queue, send_queue[:sent_len])
        if state.window is not None:
            # before repair off: writing never-sent data before the window is in place has hung connections (passt)
            w = state.window
            if state.tcp_state in FIN_IN_RECV:
                # the saved edges count the peer's FIN, which is not received yet (libsoccr does the same)
                w = dataclasses.replace(w, rcv_wup=(w.rcv_wup - 1) & 0xFFFFFFFF, rcv_wnd=w.rcv_wnd + 1)
            restore_window(session, w)
            if conn.wire().family == socket.AF_INET:
                resync_mss(session)
        apply_in_repair(session, conn.family, so)
        unsent = send_queue[sent_len:]
        if state.tcp_state != TCP_ESTABLISHED:
            if unsent:
                # our FIN goes after them: they must be in the queue before shutdown, and repair mode takes no
                # never-sent bytes (TCP_NO_QUEUE)
                session.repair_off(False)
                lift_send_limit(session)
                write_unsent(session, unsent)
                session.repair_on()
                unsent = unsent[:0]
            replay_close(session, state, send_seq, recv_seq)
        session.repair_off(True)
        lift_send_limit(session)
        write_unsent(session, unsent)
        apply_after_repair(session, so)
    except BaseException:
        _abandon(sock, session)
        raise
    return sock


def _user_mss(state: ConnectionState) -> int:
    """The user MSS the repair-mode connect sizes segments with. A new connection bounds its MSS to half the largest
    window the peer ever offered (tcp_bound_to_half_wnd, applied when the MSS is synced); the connect zeroes
    max_window before its sync, so a peer with a small window got segments larger than the window, which only the
    zero-window probe timer moved. IPv4 resyncs once the window is in place (resync_mss); IPv6 has no call that
    resyncs, so the bound goes into the user MSS here (the connect takes the timestamp option's 12 bytes off it)."""
    mss = min(state.options.mss, MAX_USER_MSS)
    w = state.window
    if w is None or w.max_window == 0 or state.tuple.wire().family == socket.AF_INET:
        return mss
    half = w.max_window >> 1 if w.max_window > MSS_DEFAULT else w.max_window
    return max(min(mss, half + (TIMESTAMP_OPTION if state.options.timestamps else 0)), MIN_USER_MSS)


def _connect_again(sock: socket.socket, session: _Session, state: ConnectionState) -> None:
    """SYN_SENT (libsoccr's recipe): nothing was negotiated yet, so the handshake runs again. Out of repair mode the
    connect sends a SYN from the saved initial sequence number (write_seq was set, so the kernel keeps it) and
    returns at once; the socket is then back in repair mode for the options."""
    session.repair_off(False)
    sock.setblocking(False)
    try:
        err = sock.connect_ex(state.tuple.remote)
    finally:
        sock.setblocking(True)
    if err not in (0, errno.EINPROGRESS):
        raise SocketCallError(err, f"connect({state.tuple.remote_addr}:{state.tuple.remote_port}) for SYN_SENT",
                              session.fd, tuple=state.tuple)
    session.repair_on()


def _abandon(sock: socket.socket, session: _Session) -> None:
    try:
        session.repair_on()
    finally:
        sock.close()


def _bind(session: _Session, state: ConnectionState) -> None:
    conn = state.tuple
    try:
        bind(session, conn.family, conn.local_addr, conn.local_port)
    except SocketCallError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AddressNotLocalError(
                f"cannot restore {conn}: local address {conn.local_addr} is not configured on this host "
                "(or in this network namespace)", tuple=conn
            ) from None
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"cannot restore {conn}: local address {conn.local_addr}:{conn.local_port} "
                                    "is held by a socket that does not allow reuse", tuple=conn) from None
        raise


def _connect(session: _Session, state: ConnectionState) -> None:
    conn = state.tuple
    try:
        connect(session, conn.family, conn.remote_addr, conn.remote_port)
    except SocketCallError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            raise AddressInUseError(
                f"cannot restore {conn}: another socket already holds this 4-tuple (close or discard it first)",
                tuple=conn,
            ) from None
        raise
