"""restore: build a live socket from a ConnectionState without a handshake, in the order the kernel demands."""

from __future__ import annotations

import dataclasses
import errno
import socket
import time

from sockrepair.engine._ffi import lib
from sockrepair.engine._queues import refill_in_repair, set_sequences, write_unsent
from sockrepair.engine._session import _Session
from sockrepair.engine._sockopts import (
    SOL,
    TCP,
    FreshValues,
    apply_after_repair,
    apply_in_repair,
    apply_pre_bind,
    lift_send_limit,
    size_buffers,
)
from sockrepair.engine._states import (
    CLOSE,
    FIN_IN_RECV,
    SETTLE_TIMEOUT,
    SYN_SENT,
    TH_ACK,
    U32,
    peer_window,
    replay_close,
    replay_reset,
    restore_seqs,
)
from sockrepair.engine._tcpopts import (
    restore_options,
    restore_timestamp,
    restore_window,
    resync_mss,
    segs_in,
    send_limits,
    set_user_mss,
)
from sockrepair.errors import (
    AddressInUseError,
    AddressNotLocalError,
    LockError,
    SocketCallError,
)
from sockrepair.lock.inject import Injector
from sockrepair.lock.ruleset import SOCCR_MARK
from sockrepair.packet import tcp_segment
from sockrepair.state import TCP_ESTABLISHED, ConnectionState, ConnTuple

MAX_USER_MSS = 32767  # MAX_TCP_WINDOW: the largest TCP_MAXSEG the kernel takes
MIN_USER_MSS = 88  # TCP_MIN_MSS: the smallest
MSS_DEFAULT = 536  # TCP_MSS_DEFAULT: tcp_bound_to_half_wnd halves only windows larger than this
TIMESTAMP_OPTION = 12  # TCPOLEN_TSTAMP_ALIGNED
SO_MARK, NODELAY = lib.SO_MARK, lib.TCP_NODELAY


def restore(state: ConnectionState) -> socket.socket:
    """A live socket (blocking, in this process and network namespace) with the saved 4-tuple, sequence numbers,
    queues and options, repair mode off; no handshake goes on the wire, only a window probe that the peer answers
    with an ACK (or the unacknowledged bytes again, docs/engine.md "Our own packets"). Until it returns the socket
    is marked SOCCR_MARK, which the network lock lets pass; then it has the saved mark. `state` is what
    checkpoint() returned (or an image of it) and is not changed; the socket of the checkpoint must be gone
    (discard) or the 4-tuple is taken. The steps, in the kernel's order, are listed in
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
    return restore_with(state, None)


def restore_with(state: ConnectionState, injector: Injector | None, answered: bool = False,
                 owed: bool = True, fresh: FreshValues | None = None) -> socket.socket:
    """restore(), with `injector`: raw sockets opened in this network namespace (sockrepair.lock.inject.Injector)
    for the segment that makes a restored socket send the ACK it may owe (_ask_for_ack); None opens them for this
    call (about 25 us: sockrepair.move.land shares one across a batch). `answered`: the peer said, after the old
    socket was gone, that it holds exactly up to the state's snd_una (sockrepair.move.ask), so every in-flight byte
    is written again as new data, however many bursts it takes (_resend_at_once). `owed`: whether the old socket
    may owe its peer an ACK; False (only from what sockrepair.engine._batch.owed_acks found for the very socket
    the state was checkpointed from: the peer got an ACK of everything it received) spares that segment and its
    wait, about 15 us of CPU per connection. The default, True, is right for a state of unknown history (an image,
    a single checkpoint). `fresh`: what a new socket of this network namespace holds (fresh_values(), read once
    for a batch): the options whose saved value it holds already are not set (engine/_sockopts.py FRESH_COPIES)."""
    conn = state.tuple
    family = conn.family
    sock = socket.socket(family, socket.SOCK_STREAM)
    session = _Session(sock.fileno(), conn, owner=sock)
    so, options = state.sockopts, state.options
    send_len, recv_len = len(state.send_queue), len(state.recv_queue)
    # views, not copies: the queues may be large, and the kernel copies them anyway
    send_queue, sent_len = memoryview(state.send_queue), send_len - state.unsent_len
    try:
        session.repair_on()
        apply_pre_bind(session, family, so)
        size_buffers(session, so, send_len, recv_len)
        _bind(sock, session, state)
        send_seq, recv_seq = restore_seqs(state)
        set_sequences(session, send_seq, send_len, recv_seq, recv_len)
        # The repair-mode connect sizes segments from the MSS clamp it sees then; TCP_REPAIR_OPTIONS sets the clamp
        # later without resizing, which left restored sockets sending 524-byte segments. A user MSS set before
        # the connect is the clamp the connect uses (the kernel caps it at MAX_TCP_WINDOW, so loopback's 65495
        # becomes 32767); it is cleared again once the connection exists.
        if state.tcp_state == SYN_SENT:
            # The SYN leaves at the connect, while the connection is still locked: unmarked, the lock dropped it and
            # the connect retried after its 1 s timeout. The route is looked up with this mark too (a policy route
            # for fwmark SOCCR_MARK would apply); the saved mark goes back once the SYN is out.
            session.set(SOL, SO_MARK, SOCCR_MARK, "SO_MARK")
            _connect_again(sock, session, state)
            apply_in_repair(session, family, so, fresh)
            session.repair_off(False)
            apply_after_repair(session, so, False)
            session.set(SOL, SO_MARK, so.mark, "SO_MARK")
            return sock
        wire = conn.wire()
        set_user_mss(session, _user_mss(state, wire.family))
        _connect(sock, session, state)
        set_user_mss(session, 0)
        restore_options(session, options)
        if options.timestamps:
            restore_timestamp(session, state.timestamp)
        # what the peer has not acknowledged leaves again as new data when it fits in the first burst
        resent = sent_len if sent_len and _resend_at_once(session, state, sent_len, answered) else 0
        if recv_len:
            # set_sequences left the receive queue selected: its bytes go in without selecting it again, and it
            # stays selected, as good as none (only TCP_SEND_QUEUE changes what tcp_write_xmit does; nothing more is
            # written in repair mode before repair goes on or off, or the send queue is selected)
            session.send_all(state.recv_queue, "refill receive queue")
        if sent_len - resent:
            refill_in_repair(session, b"", send_queue[:sent_len - resent])
        if state.window is not None:
            # before repair off: writing never-sent data before the window is in place has hung connections (passt)
            w = state.window
            if state.tcp_state == CLOSE:
                # the window of a connection that takes no more segments, from the edge the refill left: a FIN
                # re-created there is then in the window and gets a delayed ACK, which the reset cancels
                w = dataclasses.replace(w, snd_wl1=recv_seq, rcv_wup=recv_seq, rcv_wnd=max(w.rcv_wnd, 0xFFFF))
            elif state.tcp_state in FIN_IN_RECV:
                # the saved edges count the peer's FIN, which is not received yet (libsoccr does the same)
                w = dataclasses.replace(w, rcv_wup=(w.rcv_wup - 1) & 0xFFFFFFFF, rcv_wnd=w.rcv_wnd + 1)
            restore_window(session, w)
            if wire.family == socket.AF_INET and _resync_changes_mss(state):
                resync_mss(session)
        apply_in_repair(session, family, so, fresh)
        if state.tcp_state == CLOSE:
            # nothing of a reset connection goes on the wire (replay_reset), so it keeps its saved mark throughout
            replay_reset(session, state, send_seq, recv_seq)
            session.repair_off(False)
            apply_after_repair(session, so, False)
            return sock
        # The probe's answer tells us what the peer holds of data restored as sent, and whether a closed window
        # opened for never-sent data. Re-sent bytes get answers of their own (and the probe's, acknowledging
        # beyond our snd_nxt, would only be discarded); an idle connection has nothing to learn. Where no data of
        # ours will carry the ACK the old socket may have owed, it is sent (_ask_for_ack): the probe is none.
        quiet = state.tcp_state == TCP_ESTABLISHED and not resent and not state.unsent_len
        probe = not resent and not (quiet and not sent_len)
        # The connection is still locked (docs/lock.md): without the mark the lock drops what the socket sends from
        # here (the bytes written below then left only on the probe timer, max(RTO, 200 ms): 3 s where no cached
        # RTT seeds the RTO; the ACK _ask_for_ack makes it send was lost). The saved mark goes back at the end. A
        # quiet socket with nothing in flight that owes no ACK sends nothing here (no probe, no data, no segment to
        # answer: the lock holds the peer's off), so it keeps its saved mark throughout.
        silent = quiet and not probe and not owed
        if not silent:
            session.set(SOL, SO_MARK, SOCCR_MARK, "SO_MARK")
        unsent = send_queue[sent_len - resent:]
        lifted = False  # TCP_NOTSENT_LOWAT, raised only when there are bytes to write after repair off
        if state.tcp_state != TCP_ESTABLISHED:
            if unsent:
                # our FIN goes after them: they must be in the queue before shutdown, and repair mode takes no
                # never-sent bytes (TCP_NO_QUEUE)
                session.repair_off(False)
                lift_send_limit(session)
                lifted = True
                write_unsent(session, unsent)
                session.repair_on()
                unsent = unsent[:0]
            replay_close(session, state, send_seq, recv_seq)
        session.repair_off(probe)
        if resent or unsent:
            lift_send_limit(session)
            lifted = True
        if resent:
            _resend(session, so.nodelay, unsent[:resent])
            unsent = unsent[resent:]
        write_unsent(session, unsent)
        apply_after_repair(session, so, lifted)
        if quiet and owed:
            _ask_for_ack(session, state, wire, (send_seq - send_len) & U32, recv_seq, injector, probe)
        if not silent:
            session.set(SOL, SO_MARK, so.mark, "SO_MARK")
    except BaseException:
        _abandon(sock, session)
        raise
    return sock


def _resend_at_once(session: _Session, state: ConnectionState, sent_len: int, answered: bool) -> bool:
    """Whether the `sent_len` bytes the old socket sent and the peer never acknowledged can be written again as new
    data after repair off, rather than as sent in repair mode (libsoccr's way). Written as sent, what the peer never
    got (lost on the way) waits for the restored socket's first timer: the loss probe at
    TCP_TIMEOUT_INIT (1 s) when no RTT was ever measured, or the RTO seeded from the tcp_metrics cache (200 ms;
    3 s without an entry: tcp_init_metrics). Written as new, they leave at once and the peer drops what it had.
    That is safe only if ALL of them leave in the first burst: the peer acknowledges up to what it holds, and an
    ACK beyond our snd_nxt is discarded as one of unsent data, so a burst cut by the congestion window (the
    initial one: 10 segments), by the peer's window or by TCP_CORK would stall. ESTABLISHED only: a half-closed
    connection's FIN follows its bytes in repair mode (engine/_states.py). The MSS is bounded like the connection's
    own (half the peer's largest window, which the IPv4 resync applies later). When the peer `answered` that it
    holds exactly up to snd_una (sockrepair.move.ask), its ACKs never go beyond what the restored socket has sent:
    any size leaves at once, burst after burst as the ACKs come (the lock's, delivered, then the peer's own)."""
    w = state.window
    if not sent_len or w is None or state.tcp_state != TCP_ESTABLISHED or state.sockopts.cork:
        return False
    if answered:
        return True
    mss, cwnd = send_limits(session)
    if w.max_window > MSS_DEFAULT:
        mss = min(mss, w.max_window >> 1)
    segments = -(-sent_len // max(mss, 1))
    # one segment of margin: the timestamp option makes the segments a little smaller than the bound
    return segments < cwnd and sent_len <= w.snd_wnd


def _resend(session: _Session, nodelay: bool, resent: memoryview) -> None:
    """Write the bytes the peer never acknowledged again, alone and with Nagle off, so that the last one leaves with
    the rest as a short segment (ending where the old socket's snd_nxt did); the never-sent bytes follow in a write
    of their own. Written together they shared segments, and a full one across the old snd_nxt could end beyond
    the peer's window: it stayed queued, the peer's ACKs (beyond our snd_nxt) were discarded, and the connection
    waited for retransmission timeouts (seen on loopback with a 93 KiB window: 47,616-byte segments, 80 KiB in
    flight, the peer's window full)."""
    if not nodelay:
        session.set(TCP, NODELAY, 1, "TCP_NODELAY")
    write_unsent(session, resent)
    if not nodelay:
        session.set(TCP, NODELAY, 0, "TCP_NODELAY")


def _ask_for_ack(session: _Session, state: ConnectionState, wire: ConnTuple, una: int, rcv_nxt: int,
                 injector: Injector | None, probed: bool) -> None:
    """Make the restored socket acknowledge what the old one received: an ACK it owed (a delayed ACK pending at the
    freeze, or one the lock dropped) is not in any state repair mode can set, and the window probe sent at repair
    off is no acknowledgment (its sequence number is one below snd_una: the peer checks it, finds it old and
    answers without reading its ACK field). A segment from the peer one below rcv_nxt (a keepalive's, through a
    raw socket marked SOCCR_MARK: sockrepair/lock/inject.py) is old in turn, and the restored socket answers it
    with a true ACK of rcv_nxt (tcp_send_dupack), which passes the lock while the socket is marked. Waits, at most
    SETTLE_TIMEOUT, until the socket has taken the segment in (tcpi_segs_in): it is normally processed before
    sendto returns, and the mark is about to go. A socket that sent no window probe (`probed`) has taken in no
    segment yet: the peer's are held off by the lock, and the repair-mode connect receives none. Without
    `injector`, one raw socket of the connection's family is opened for the segment. Without CAP_NET_RAW nothing
    is sent: the peer then gets its ACK when it retransmits, as before. `wire`: the connection's wire()."""
    before = segs_in(session) if probed else 0
    family = wire.family
    segment = tcp_segment(family, wire.remote_addr, wire.remote_port, wire.local_addr, wire.local_port,
                          (rcv_nxt - 1) & U32, una, TH_ACK, peer_window(state))
    try:
        if injector is not None:
            injector.send_segment(segment, family, wire.local_addr)
        else:
            with Injector(families=(family,)) as own:
                own.send_segment(segment, family, wire.local_addr)
    except (OSError, LockError):
        return
    if segs_in(session) != before:
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while segs_in(session) == before and time.monotonic() < deadline:
        time.sleep(0.001)


def _resync_changes_mss(state: ConnectionState) -> bool:
    """Whether resync_mss (IPv4) would size segments differently from the repair-mode connect: the connect synced
    the MSS with the user MSS as its clamp (_user_mss: the saved MSS, capped at MAX_USER_MSS) and no window bound
    (max_window was 0), the resync with TCP_REPAIR_OPTIONS' clamp (the saved MSS) and half the restored max_window
    (tcp_bound_to_half_wnd); the path MTU, header lengths and MTU probing bounds are the same for both. So it changes
    nothing when the saved MSS is under the cap and the bound does not bite."""
    mss = state.options.mss
    w = state.window
    if mss > MAX_USER_MSS:
        return True
    if w is None or w.max_window == 0:
        return False
    cutoff = w.max_window >> 1 if w.max_window > MSS_DEFAULT else w.max_window
    return cutoff < mss


def _user_mss(state: ConnectionState, wire_family: int) -> int:
    """The user MSS the repair-mode connect sizes segments with. A new connection bounds its MSS to half the largest
    window the peer ever offered (tcp_bound_to_half_wnd, applied when the MSS is synced); the connect zeroes
    max_window before its sync, so a peer with a small window got segments larger than the window, which only the
    zero-window probe timer moved. IPv4 resyncs once the window is in place (resync_mss); IPv6 has no call that
    resyncs, so the bound goes into the user MSS here (the connect takes the timestamp option's 12 bytes off it).
    `wire_family`: the family of the connection's wire() tuple."""
    mss = min(state.options.mss, MAX_USER_MSS)
    w = state.window
    if w is None or w.max_window == 0 or wire_family == socket.AF_INET:
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


def _bind(sock: socket.socket, session: _Session, state: ConnectionState) -> None:
    conn = state.tuple
    try:
        sock.bind((conn.local_addr, conn.local_port))
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AddressNotLocalError(
                f"cannot restore {conn}: local address {conn.local_addr} is not configured on this host "
                "(or in this network namespace)", tuple=conn
            ) from None
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"cannot restore {conn}: local address {conn.local_addr}:{conn.local_port} "
                                    "is held by a socket that does not allow reuse", tuple=conn) from None
        raise session.failed(f"bind({conn.local_addr}:{conn.local_port})", exc) from None


def _connect(sock: socket.socket, session: _Session, state: ConnectionState) -> None:
    """The repair-mode connect: no handshake, it returns at once."""
    conn = state.tuple
    try:
        sock.connect((conn.remote_addr, conn.remote_port))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            raise AddressInUseError(
                f"cannot restore {conn}: another socket already holds this 4-tuple (close or discard it first)",
                tuple=conn,
            ) from None
        raise session.failed(f"connect({conn.remote_addr}:{conn.remote_port})", exc) from None
