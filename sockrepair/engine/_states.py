"""Half-closed connections: where the FINs sit in the sequence space, and how restore re-creates them (libsoccr's
recipe, soccr/soccr.c libsoccr_restore).

TCP_QUEUE_SEQ counts a FIN as one sequence number: the send queue's end (write_seq) includes our FIN once shutdown
queued it, the receive queue's end (rcv_nxt) includes the peer's once it arrived. SIOCOUTQ (write_seq - snd_una)
and SIOCOUTQNSD (write_seq - snd_nxt) count our FIN while it is not acknowledged (not sent); SIOCINQ never counts the
peer's. The state keeps the raw TCP_QUEUE_SEQ values, as criu's images do, and queue lengths without FINs.

Restore builds the connection as ESTABLISHED, with each sequence number one short of a FIN it holds, then replays
the close in the order the state was reached: shutdown(SHUT_WR) in repair mode queues our FIN (marked sent, by
selecting the send queue, when the peer acknowledged it), and the peer's FIN or its ACK of ours is re-created as a
segment from the peer, sent through a raw socket marked SOCCR_MARK so that the network lock lets it through. It
carries no TCP options; on loopback it is processed before sendto returns, and restore checks the state it led to.

| state      | our FIN              | the peer's FIN | replayed                                     |
|------------|----------------------|----------------|----------------------------------------------|
| FIN_WAIT1  | not acknowledged     | -              | shutdown                                     |
| FIN_WAIT2  | acknowledged         | -              | shutdown (sent), the peer's ACK              |
| CLOSE_WAIT | -                    | received       | the peer's FIN                               |
| CLOSING    | not acknowledged     | received       | shutdown, the peer's FIN                     |
| LAST_ACK   | not acknowledged     | received       | the peer's FIN, shutdown                     |
| CLOSE      | (whatever it was)    | (if it matters)| the peer's RST (after its FIN, see below)    |

CLOSE after a connection (a reset arrived, the close ended in LAST_ACK or TIME_WAIT) takes no more segments: the
socket left the established hash, its write queue is gone and only the application's view is left: the unread bytes,
then b"" or a pending error (sk_err). recv() returns the bytes, then, when no error is pending or the peer's FIN had
arrived (SOCK_DONE), b""; otherwise the error once (tcp_recvmsg), then b"". send() fails with the pending error,
else EPIPE. checkpoint reads the error with SO_ERROR (which clears it, as the application's next call would have)
and tells SOCK_DONE from its absence by peeking past the unread bytes: with SOCK_DONE the peek returns 0 before the
kernel looks at sk_err. restore re-creates the error the only way the kernel sets it without a timer: a RST from
the peer (tcp_reset: EPIPE in CLOSE_WAIT, ECONNRESET in the other states), after the peer's FIN when SOCK_DONE
matters and, for ECONNRESET after that FIN, our own FIN marked sent (LAST_ACK); the error a reset leaves is cleared
with SO_ERROR when there was none. An error no reset gives (ETIMEDOUT, ECONNABORTED, an ICMP error) is refused.
A RST is never answered, and the delayed ACK of a re-created FIN dies with the reset sent right after it (tcp_done
clears the timers), so nothing reaches the wire but in the rare case docs/engine.md describes, where the network
lock drops that ACK (soccr/soccr.c instead replays LAST_ACK and the peer's ACK of our FIN; the ACK our kernel may
send for the re-created FIN goes to a peer that is gone, which answers it with RST).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from sockrepair.engine._addr import read_tuple
from sockrepair.engine._ffi import lib
from sockrepair.engine._session import PEEK_FLAGS, _Session
from sockrepair.engine._tcpopts import tcp_info
from sockrepair.errors import RestoreError, SocketCallError, SocketStateError
from sockrepair.lock.inject import Injector
from sockrepair.packet import tcp_packet
from sockrepair.state import ConnectionState, ConnTuple, Payload, state_name

ESTABLISHED, FIN_WAIT1, FIN_WAIT2 = lib.TCP_ESTABLISHED, lib.TCP_FIN_WAIT1, lib.TCP_FIN_WAIT2
CLOSE_WAIT, LAST_ACK, CLOSING = lib.TCP_CLOSE_WAIT, lib.TCP_LAST_ACK, lib.TCP_CLOSING
# Our FIN is in the send sequence space (write_seq counts it).
FIN_IN_SEND = frozenset({FIN_WAIT1, FIN_WAIT2, CLOSING, LAST_ACK})
# The peer's FIN is in the receive sequence space (rcv_nxt counts it).
FIN_IN_RECV = frozenset({CLOSE_WAIT, LAST_ACK, CLOSING})
SYN_SENT = lib.TCP_SYN_SENT
CLOSE = lib.TCP_CLOSE
REPAIRABLE = frozenset({ESTABLISHED, SYN_SENT, CLOSE}) | FIN_IN_SEND | FIN_IN_RECV
TH_FIN, TH_RST, TH_ACK = 0x01, 0x04, 0x10
# The pending errors of a closed connection that restore re-creates: none, and those of the peer's RST (tcp_reset).
RESET_ERRORS = frozenset({0, errno.ECONNRESET, errno.EPIPE})
U32 = 0xFFFFFFFF
# How long restore waits for a re-created segment to be processed (it normally is before sendto returns).
SETTLE_TIMEOUT = 2.0


def send_lengths(tcp_state: int, outq: int, unsent: int) -> tuple[int, int]:
    """SIOCOUTQ and SIOCOUTQNSD without our FIN: the send queue's bytes, and how many of them were never sent. In
    CLOSE none: a reset purges the write queue without moving snd_una, and nothing left there would ever be sent
    (libsoccr's refresh_sk drops it too)."""
    if tcp_state == CLOSE:
        return 0, 0
    if tcp_state in FIN_IN_SEND:
        return max(outq - 1, 0), max(unsent - 1, 0)
    return outq, unsent


def restore_seqs(state: ConnectionState) -> tuple[int, int]:
    """(send_seq, recv_seq) as restore sets them on the ESTABLISHED socket it builds: without the FINs; for
    SYN_SENT without the SYN (write_seq counts it: the connect sends it again from the ISN); in CLOSE without the
    peer's FIN when replay_reset re-creates it."""
    ours = state.tcp_state in FIN_IN_SEND or state.tcp_state == SYN_SENT
    theirs = state.tcp_state in FIN_IN_RECV or (state.tcp_state == CLOSE and state.fin_received)
    return (state.send_seq - ours) & U32, (state.recv_seq - theirs) & U32


def peer_segment(state: ConnectionState, flags: int, seq: int, ack: int) -> bytes:
    """A segment from the peer to us (no options, no payload), its checksums 0 (packet.tcp_packet)."""
    t = state.tuple.wire()
    return tcp_packet(t.family, t.remote_addr, t.remote_port, t.local_addr, t.local_port, seq, ack, flags,
                      peer_window(state))


def peer_window(state: ConnectionState) -> int:
    """The window field of the peer's segments: our send window (TCP_REPAIR_WINDOW snd_wnd, bytes) shifted by the
    peer's scale (snd_wscale) when window scaling is on; 0 for a state without a window."""
    o, w = state.options, state.window
    return 0 if w is None else (w.snd_wnd >> o.snd_wscale if o.wscale else w.snd_wnd)


def _settle(session: _Session, want: int, what: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (now := tcp_info(session).tcpi_state) != want:
        if time.monotonic() > deadline:
            raise RestoreError(f"cannot restore {session.tuple} in {state_name(want)}: after {what} the socket is "
                               f"{state_name(now)}", tuple=session.tuple)
        time.sleep(0.001)


def _shutdown(session: _Session, acked: bool) -> None:
    """Queue our FIN in repair mode; with the send queue selected the kernel marks it sent."""
    if acked:
        session.select_queue(lib.TCP_SEND_QUEUE)
    if lib.shutdown(session.fd, lib.SHUT_WR) < 0:
        raise session.fail("shutdown(SHUT_WR) in repair mode")
    if acked:
        session.select_queue(lib.TCP_NO_QUEUE)


def replay_close(session: _Session, state: ConnectionState, send_seq: int, recv_seq: int) -> None:
    """On the ESTABLISHED socket restore built (repair mode on, queues and window in place, never-sent bytes
    written), re-create the FINs of `state.tcp_state` (the table above). `send_seq`/`recv_seq`: restore_seqs().
    Raises RestoreError when the socket does not reach the state, SocketCallError when a call fails, LockError when
    a re-created segment cannot be sent (CAP_NET_RAW is needed)."""
    tcp_state = state.tcp_state
    una = (send_seq - len(state.send_queue)) & U32
    with Injector() as injector:
        if tcp_state in (FIN_WAIT1, FIN_WAIT2, CLOSING):
            _shutdown(session, acked=tcp_state == FIN_WAIT2)
            _settle(session, FIN_WAIT1, "shutdown")
        if tcp_state in FIN_IN_RECV:
            injector.send([peer_segment(state, TH_FIN | TH_ACK, recv_seq, una)])
            _settle(session, CLOSE_WAIT if tcp_state != CLOSING else CLOSING, "the peer's FIN")
        if tcp_state == LAST_ACK:
            _shutdown(session, acked=False)
        if tcp_state == FIN_WAIT2:
            injector.send([peer_segment(state, TH_ACK, recv_seq, state.send_seq)])
        _settle(session, tcp_state, "re-creating the close")


@dataclass
class ClosedSnapshot:
    """What checkpoint keeps of a connection in CLOSE: the raw TCP_QUEUE_SEQ of both queues, the unread bytes, the
    pending error (an errno, 0 for none) and whether the peer's FIN had arrived (SOCK_DONE; False when no error is
    pending, where it changes nothing the application sees)."""

    send_seq: int
    recv_seq: int
    recv_queue: Payload
    sk_err: int
    fin_received: bool


def read_closed(session: _Session) -> ClosedSnapshot:
    """In repair mode, on a socket in CLOSE whose refusals were checked (SO_PEEK_OFF is off): the ClosedSnapshot.
    Reading the pending error clears it (SO_ERROR, or the peek that returns it): resume() cannot put it back.
    Raises SocketStateError (`.fd`, `.tuple`, `.tcp_state`) for bytes past SIOCINQ (an urgent mark) or an error
    no reset gives, SocketCallError when a call fails."""
    get_u32, select, peek = session.get_u32, session.select_queue, session.peek
    select(lib.TCP_SEND_QUEUE)
    send_seq = get_u32(lib.IPPROTO_TCP, lib.TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ send")
    select(lib.TCP_RECV_QUEUE)
    recv_seq = get_u32(lib.IPPROTO_TCP, lib.TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ receive")
    inq = session.ioctl(lib.SIOCINQ, "SIOCINQ")
    recv_queue = peek(inq, "receive queue")
    try:
        past = _peek_past(session, inq)
    finally:
        select(lib.TCP_NO_QUEUE)
    if past > 0:
        raise SocketStateError(
            f"fd {session.fd} ({session.tuple}) in CLOSE holds bytes past its {inq} unread ones (an urgent mark: "
            "urgent data (MSG_OOB) cannot be moved); it was left as it was", fd=session.fd, tuple=session.tuple,
            tcp_state=CLOSE)
    sk_err, fin_received = -past, False
    if past == 0:
        # SOCK_DONE stops the peek before sk_err is looked at: an error still pending means the FIN had arrived
        sk_err = session.get(lib.SOL_SOCKET, lib.SO_ERROR, "SO_ERROR")
        fin_received = sk_err != 0
    if sk_err not in RESET_ERRORS:
        raise SocketStateError(
            f"fd {session.fd} ({session.tuple}) in CLOSE holds the error {errno.errorcode.get(sk_err, sk_err)} "
            f"({os.strerror(sk_err)}), which only a reset (ECONNRESET, EPIPE) can give a restored socket; the "
            "error was read (the application will not see it)", fd=session.fd, tuple=session.tuple, tcp_state=CLOSE)
    return ClosedSnapshot(send_seq, recv_seq, recv_queue, sk_err, fin_received)


def _peek_past(session: _Session, inq: int) -> int:
    """recv(MSG_PEEK) of one byte after the `inq` unread ones: 1 when there is one, 0 at the end of the stream,
    -errno when the kernel returned the pending error instead. SocketStateError on a kernel without SO_PEEK_OFF
    for TCP when there are unread bytes (nothing was read then)."""
    fd = session.fd
    if inq:
        try:
            session.set(lib.SOL_SOCKET, lib.SO_PEEK_OFF, inq, "SO_PEEK_OFF")
        except SocketCallError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            raise SocketStateError(
                f"fd {fd} ({session.tuple}) is in CLOSE with unread bytes, and this kernel has no SO_PEEK_OFF for "
                "TCP (Linux 6.10+): what follows them (b\"\" or a pending error) cannot be read apart from them; it "
                "was left as it was", fd=fd, tuple=session.tuple, tcp_state=CLOSE) from None
    try:
        return len(session.sock.recv(1, PEEK_FLAGS))
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            raise session.failed("recv(MSG_PEEK) past the receive queue in CLOSE", exc) from None
        return -(exc.errno or errno.EIO)
    finally:
        if inq:
            session.set(lib.SOL_SOCKET, lib.SO_PEEK_OFF, -1, "SO_PEEK_OFF")


def replay_reset(session: _Session, state: ConnectionState, send_seq: int, recv_seq: int) -> None:
    """On the ESTABLISHED socket restore built for a CLOSE state (repair mode on, the receive queue refilled, the
    send queue empty), re-create the close (the module's docstring): the peer's FIN when `state.fin_received`, our
    FIN marked sent when the error is ECONNRESET after it, the peer's RST, and SO_ERROR read when `state.sk_err`
    is 0. `send_seq`/`recv_seq`: restore_seqs(). Raises RestoreError for an error no reset gives (or EPIPE without
    the peer's FIN, which no kernel leaves) or a state not reached, LockError when a segment cannot be sent."""
    err, fin = state.sk_err, state.fin_received
    if err not in RESET_ERRORS or (err == errno.EPIPE and not fin):
        raise RestoreError(f"cannot restore {state.tuple} in CLOSE with the error {err}"
                           f"{'' if fin else ' and no FIN from the peer'}: only a reset's can be re-created",
                           tuple=state.tuple)
    fin_first = bool(err and fin)
    # accepted at rcv_nxt exactly (else answered with a challenge ACK): only once the FIN before it was taken
    rst = peer_segment(state, TH_RST | TH_ACK, recv_seq + fin_first, send_seq)
    with Injector() as injector:
        if not fin_first:
            injector.send([rst])
        else:
            # Back to back: the FIN arms a delayed ACK at its shortest (icsk_ack.ato is 0 on a socket that never
            # received a segment: it fires at the next tick), which the RST cancels (tcp_done clears the timers).
            fin_segment = peer_segment(state, TH_FIN | TH_ACK, recv_seq, send_seq)
            if err == errno.EPIPE:
                injector.send([fin_segment, rst])
            else:
                injector.send([fin_segment])
                _shutdown(session, acked=True)  # CLOSE_WAIT -> LAST_ACK, where a reset leaves ECONNRESET
                injector.send([rst])
        _settle(session, CLOSE, "the peer's RST")
    if not err:
        session.get(lib.SOL_SOCKET, lib.SO_ERROR, "SO_ERROR")


def closed_tuple(fd: int) -> ConnTuple | None:
    """The 4-tuple of the TCP socket `fd` when it is in CLOSE and still holds its peer (SO_PEERNAME): a connection
    that was reset, or whose close ended, while its application holds it; None in any other state, or without a
    peer (never connected, or disconnected). Such a socket is in no hash table: /proc/net/tcp and sock_diag do not
    list it. Raises SocketCallError when a call fails."""
    session = _Session(fd)
    if tcp_info(session).tcpi_state != CLOSE:
        return None
    return closed_peer(session)


def closed_peer(session: _Session) -> ConnTuple | None:
    """The 4-tuple of the session's socket, known to be in CLOSE (getsockname and SO_PEERNAME: getpeername says
    ENOTCONN there); None when it has no peer (never connected, or disconnected with connect(AF_UNSPEC)). Raises
    SocketCallError when a call fails otherwise."""
    try:
        return read_tuple(session, closed=True)
    except SocketCallError as exc:
        if exc.errno == errno.ENOTCONN:
            return None
        raise
