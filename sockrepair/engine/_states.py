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
"""

from __future__ import annotations

import socket
import struct
import time

from sockrepair.engine._ffi import lib
from sockrepair.engine._session import _Session
from sockrepair.engine._tcpopts import tcp_info
from sockrepair.errors import RestoreError
from sockrepair.lock.inject import Injector
from sockrepair.packet import with_checksums
from sockrepair.state import ConnectionState, state_name

ESTABLISHED, FIN_WAIT1, FIN_WAIT2 = lib.TCP_ESTABLISHED, lib.TCP_FIN_WAIT1, lib.TCP_FIN_WAIT2
CLOSE_WAIT, LAST_ACK, CLOSING = lib.TCP_CLOSE_WAIT, lib.TCP_LAST_ACK, lib.TCP_CLOSING
# Our FIN is in the send sequence space (write_seq counts it).
FIN_IN_SEND = frozenset({FIN_WAIT1, FIN_WAIT2, CLOSING, LAST_ACK})
# The peer's FIN is in the receive sequence space (rcv_nxt counts it).
FIN_IN_RECV = frozenset({CLOSE_WAIT, LAST_ACK, CLOSING})
SYN_SENT = lib.TCP_SYN_SENT
REPAIRABLE = frozenset({ESTABLISHED, SYN_SENT}) | FIN_IN_SEND | FIN_IN_RECV
TH_FIN, TH_ACK = 0x01, 0x10
U32 = 0xFFFFFFFF
# How long restore waits for a re-created segment to be processed (it normally is before sendto returns).
SETTLE_TIMEOUT = 2.0


def send_lengths(tcp_state: int, outq: int, unsent: int) -> tuple[int, int]:
    """SIOCOUTQ and SIOCOUTQNSD without our FIN: the send queue's bytes, and how many of them were never sent."""
    if tcp_state in FIN_IN_SEND:
        return max(outq - 1, 0), max(unsent - 1, 0)
    return outq, unsent


def restore_seqs(state: ConnectionState) -> tuple[int, int]:
    """(send_seq, recv_seq) as restore sets them on the ESTABLISHED socket it builds: without the FINs; for
    SYN_SENT without the SYN (write_seq counts it: the connect sends it again from the ISN)."""
    ours = state.tcp_state in FIN_IN_SEND or state.tcp_state == SYN_SENT
    return (state.send_seq - ours) & U32, (state.recv_seq - (state.tcp_state in FIN_IN_RECV)) & U32


def _segment(state: ConnectionState, flags: int, seq: int, ack: int) -> bytes:
    """A segment from the peer to us (no options, no payload), checksums computed."""
    t = state.tuple.wire()
    o, w = state.options, state.window
    wnd = 0 if w is None else (w.snd_wnd >> o.snd_wscale if o.wscale else w.snd_wnd)
    tcp = struct.pack(">HHIIBBHHH", t.remote_port, t.local_port, seq & U32, ack & U32, 5 << 4, flags,
                      min(wnd, 0xFFFF), 0, 0)
    src, dst = socket.inet_pton(t.family, t.remote_addr), socket.inet_pton(t.family, t.local_addr)
    if t.family == socket.AF_INET:
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, src, dst)
    else:
        ip = struct.pack(">IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64, src, dst)
    return with_checksums(ip + tcp)


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
            injector.send([_segment(state, TH_FIN | TH_ACK, recv_seq, una)])
            _settle(session, CLOSE_WAIT if tcp_state != CLOSING else CLOSING, "the peer's FIN")
        if tcp_state == LAST_ACK:
            _shutdown(session, acked=False)
        if tcp_state == FIN_WAIT2:
            injector.send([_segment(state, TH_ACK, recv_seq, state.send_seq)])
        _settle(session, tcp_state, "re-creating the close")
