"""Before a restore, ask each peer how much of our in-flight data it holds, so that the restored socket can send the
rest again at once as new data, whatever its size (issue 11, section 3).

Why asking is needed: data written again as new data leaves only as far as the initial congestion window lets it
(10 segments), and the peer acknowledges up to what it holds. If it holds more than that first burst carries, its
ACKs are beyond the restored socket's snd_nxt, and tcp_ack discards them as ACKs of unsent data (net/ipv4/tcp_input.c,
SKB_DROP_REASON_TCP_ACK_UNSENT_DATA): the socket stalls until its retransmission timeouts. The highest ACK the lock
kept is not enough: the peer may hold more that a delayed ACK has not covered yet (__tcp_ack_snd_check acknowledges
at once only past one full segment, and only when the window it would offer is no smaller than the one it offered:
an application that does not read delays every ACK to the timer). In-flight bytes that fit in one segment leave at
once without an answer (_one_segment): when the connections stay in their namespace, those peers are not asked.

How: once the old socket is gone (nothing else of ours can reach the peer any more), a raw socket marked SOCCR_MARK
(lock/inject.py) sends the peer, as our old socket would, one byte of old data at snd_una - 1. The peer holds it
already, so it drops it and acknowledges at once (tcp_data_queue's duplicate path enters quick-ACK mode; when the
segment is left of rcv_wup, tcp_validate_incoming's tcp_send_dupack, which rate-limits segments without data only):
its ACK carries rcv_nxt, everything it holds in order. The lock stops that answer and the recorder keeps it. Any
packet the peer sends once the probe reached it carries that same rcv_nxt (nothing else of ours reaches it any
more), so the first new packet kept is an answer, and the highest ACK kept for the connection is exactly what the
peer holds, unless its answer has SACK blocks beyond
it (data held out of order, lost before the lock): then the peer's ACK could jump past the first burst again, and
the state is left as it was. The state is cut to that ACK (snd_una advanced, the acknowledged bytes dropped from the
send queue, the send window's right edge kept), and restore writes the rest again as new data
(engine/_restore.py, `answered`). Without a recorder in the namespace of the restore (where the answers arrive), or
without an answer within ANSWER_TIMEOUT, nothing changes and restore uses its one-burst rule; a connection whose two
ends move together is not asked (its peer has no socket to answer: its kernel's RST is dropped by the lock).

A peer still silent after RETRY_AFTER is asked once more: its answer can be lost on the way while the network
still sends our address to the old host (a bridge that has not yet forgotten the old port, a neighbour cache:
measured in sockrepair/lab/hosts.py's cross-host lab, where about one move in four waited the whole
ANSWER_TIMEOUT before). Once only: every answer is a duplicate ACK, which the restored socket receives with what
the lock kept, and a peer without SACK counts them towards its fast retransmit's three."""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sockrepair.engine._restore import MSS_DEFAULT
from sockrepair.errors import LockError
from sockrepair.lock.inject import Injector
from sockrepair.move.keep import Keeper
from sockrepair.netns import inside
from sockrepair.packet import tcp_packet
from sockrepair.state import TCP_ESTABLISHED, ConnectionState

U32 = 0xFFFFFFFF
TH_ACK = 0x10
TCPOPT_EOL, TCPOPT_NOP, TCPOPT_SACK = 0, 1, 5
TCPOLEN_TSTAMP_ALIGNED = 12  # include/net/tcp.h: what the timestamp option takes from every segment
# the peers answer within a round trip; one that does not (unreachable, or its answer lands where nothing records)
# costs this much downtime once per move, and its connection is restored as before
ANSWER_TIMEOUT = 0.2
# a round trip on a LAN is well under this; a peer slower to answer gets a second probe it answers too
RETRY_AFTER = 0.02


@dataclass(frozen=True)
class Asked:
    """`states`: the states to restore, each cut to what its peer answered it holds; `answered[i]`: whether state i
    was cut to an answer (restore then writes all its in-flight bytes again as new data)."""

    states: list[ConnectionState]
    answered: list[bool]


def ask_peers(keeper: Keeper | None, states: Sequence[ConnectionState], into: str, same_place: bool = False) -> Asked:
    """Ask the peer of every ESTABLISHED state with in-flight bytes what it holds (the module's docstring), the
    probes sent from the network namespace at path `into` (where the connections are restored; the old sockets
    must be gone), the answers read from `keeper`'s recorders (None: not keeping, nothing is asked); a connection
    whose other end is among `states` too is not asked. Waits at most ANSWER_TIMEOUT. Never raises for a peer that
    does not answer or a probe the kernel refuses (no CAP_NET_RAW): those states are returned as they were.
    `same_place`: the connections are restored in the network namespace they were taken in; only then are peers
    whose in-flight bytes fit in one segment left unasked (_one_segment). Moved elsewhere (another host), the
    answer is also the first sign that the network brings the peer's packets to the new home: in the cross-host
    lab, a move that did not wait for it unlocked before the network had converged in about one move of six, and
    the peer's next request, sent to the old host, waited its retransmission timeout."""
    answered = [False] * len(states)
    out = list(states)
    # the answers come where the connections are restored: without a recorder there, nobody would see them
    if keeper is None or not keeper.records_in(into):
        return Asked(out, answered)
    # a peer that moves too (both ends in `states`) has no socket before its own restore: its kernel answers the
    # probe with a RST, which the lock drops, and the wait would run to ANSWER_TIMEOUT for nothing
    candidates = [i for i, s in enumerate(states) if _worth_asking(s) and not (same_place and _one_segment(s))]
    if not candidates:
        return Asked(out, answered)
    moving = {s.tuple.wire() for s in states}
    asked = [i for i in candidates if states[i].tuple.wire().reversed() not in moving]
    if not asked:
        return Asked(out, answered)
    before = {i: len(packets) for i, packets in zip(asked, keeper.peek([states[i].tuple for i in asked]))}
    if not _send_probes(into, [states[i] for i in asked]):
        return Asked(out, answered)
    start = time.monotonic()
    retried = False
    waiting = asked
    while True:
        kept = keeper.peek([states[i].tuple for i in waiting])
        waiting = [i for i, packets in zip(waiting, kept) if not _answered(states[i], packets[before[i]:])]
        now = time.monotonic()
        if not waiting or now > start + ANSWER_TIMEOUT:
            break
        if not retried and now > start + RETRY_AFTER:
            retried = True
            _send_probes(into, [states[i] for i in waiting])
        time.sleep(0.0005)
    silent = set(waiting)
    answers = [i for i in asked if i not in silent]
    for i, packets in zip(answers, keeper.peek([states[i].tuple for i in answers])):
        held = _held(states[i], packets)
        if held is not None:
            out[i], answered[i] = _cut(states[i], held), True
    return Asked(out, answered)


def _send_probes(into: str, states: Sequence[ConnectionState]) -> bool:
    """The probes of `states`, sent from the network namespace at path `into`; False when they could not be (no
    CAP_NET_RAW, or the kernel refused one)."""
    try:
        with inside(into), Injector() as injector:
            injector.send([_probe(s) for s in states])
    except (OSError, LockError):
        return False
    return True


def _answered(state: ConnectionState, new: Sequence[bytes]) -> bool:
    """Whether the packets kept since the probe left hold the peer's answer. With SACK, only the answer itself: it
    carries the D-SACK block of the probe's byte, ending at snd_una (RFC 2883; tcp_dsack_set on both of the
    peer's duplicate paths). A packet the peer sent before our last segment reached it, arriving late (a path
    longer than the time from the lock to the ask), carries an older ACK: taken for the answer, it would cut the
    state short and the peer's true ACK could pass the restored snd_nxt. Without SACK nothing tells the answer
    apart: the first new packet counts (the peer's older packets have arrived long before on loopback or a LAN).
    A peer with net.ipv4.tcp_dsack off never answers this way: its connection waits ANSWER_TIMEOUT and is
    restored as before."""
    if not state.options.sack:
        return bool(new)
    una = _una(state)
    return any(parsed is not None and una in parsed[1] for parsed in map(_ack_and_sack_ends, new))


def _worth_asking(state: ConnectionState) -> bool:
    # TCP_CORK would hold a last short segment back: restore keeps corked connections' bytes as sent. Never-sent
    # bytes alone are worth asking about too: a restore of the same images that was put back (sockrepair restore -D
    # interrupted before its handoff) may have sent them, and a peer that holds them acknowledges beyond the
    # snd_nxt of a restore that does not know it (its ACKs then discarded, the connection stalled for good)
    return (state.tcp_state == TCP_ESTABLISHED and state.window is not None and not state.sockopts.cork
            and len(state.send_queue) > 0)


def _one_segment(state: ConnectionState) -> bool:
    """Whether the state's in-flight bytes, and nothing never sent, fit in one segment of the restored socket (the
    saved MSS less the timestamp option, bounded by half the peer's largest window as the restore bounds it) and in
    the peer's window: restore then writes them again as new data without an answer (engine/_restore.py's
    one-burst rule), and the peer's ACK cannot pass a snd_nxt that covers them all. A request/response peer's
    answer to a short request is the common case: asking it costs a round trip and a probe for nothing."""
    w, o = state.window, state.options
    if w is None or state.unsent_len:
        return False
    mss = o.mss - (TCPOLEN_TSTAMP_ALIGNED if o.timestamps else 0)
    if w.max_window > MSS_DEFAULT:
        mss = min(mss, w.max_window >> 1)
    return len(state.send_queue) <= min(mss, w.snd_wnd)


def _una(state: ConnectionState) -> int:
    return (state.send_seq - len(state.send_queue)) & U32


def _probe(state: ConnectionState) -> bytes:
    """One byte at snd_una - 1 from us to the peer, acknowledging our rcv_nxt, no options, checksums 0
    (packet.tcp_packet); its content is never read (the peer holds that byte already)."""
    t = state.tuple.wire()
    w, o = state.window, state.options
    assert w is not None
    wnd = w.rcv_wnd >> o.rcv_wscale if o.wscale else w.rcv_wnd
    return tcp_packet(t.family, t.local_addr, t.local_port, t.remote_addr, t.remote_port, _una(state) - 1,
                      state.recv_seq, TH_ACK, wnd, b"\0")


def _held(state: ConnectionState, packets: Sequence[bytes]) -> int | None:
    """How many bytes of the send queue the peer holds, from the highest ACK among its kept `packets` (offsets from
    snd_una, mod 2**32, within the send queue: beyond the in-flight bytes only when an earlier restore of the same
    images sent never-sent ones and was put back); None when a SACK block says it holds data beyond that ACK."""
    una, queued = _una(state), len(state.send_queue)
    held = 0
    blocks: list[int] = []
    for packet in packets:
        parsed = _ack_and_sack_ends(packet)
        if parsed is None:
            continue
        ack, ends = parsed
        offset = (ack - una) & U32
        if offset <= queued:
            held = max(held, offset)
        blocks += [(end - una) & U32 for end in ends]
    # a D-SACK block (the probe's byte, or other duplicates) ends at or below the ACK; any other is data held
    # beyond a hole
    if any(held < end <= queued for end in blocks):
        return None
    return held


def _ack_and_sack_ends(packet: bytes) -> tuple[int, list[int]] | None:
    """The ACK number and the right edges of the SACK blocks of a TCP packet with ACK set (IPv4 or IPv6 without
    extension headers, as the recorder keeps them); None for one without ACK."""
    ip_len = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    if len(packet) < ip_len + 20:
        return None
    ack, offset_flags = struct.unpack_from(">IH", packet, ip_len + 8)
    if not offset_flags & TH_ACK:
        return None
    options = packet[ip_len + 20 : ip_len + (offset_flags >> 12) * 4]
    ends: list[int] = []
    pos = 0
    while pos < len(options) and options[pos] != TCPOPT_EOL:
        if options[pos] == TCPOPT_NOP:
            pos += 1
            continue
        if pos + 1 >= len(options) or options[pos + 1] < 2:
            break
        kind, length = options[pos], options[pos + 1]
        if kind == TCPOPT_SACK:
            body = options[pos + 2 : pos + length]
            ends += [struct.unpack_from(">I", body, n + 4)[0] for n in range(0, len(body) - 7, 8)]
        pos += length
    return int(ack), ends


def _cut(state: ConnectionState, held: int) -> ConnectionState:
    """`state` with the peer's acknowledgment of `held` more bytes applied, as the kernel would have: snd_una
    advanced, those bytes gone from the send queue (never-sent ones too, when an earlier restore sent them: the
    rest of the queue is then never-sent), the send window's right edge where it was."""
    if not held:
        return state
    w = state.window
    assert w is not None
    queue = state.send_queue[held:]
    return dataclasses.replace(state, send_queue=queue, unsent_len=min(state.unsent_len, len(queue)),
                               window=dataclasses.replace(w, snd_wnd=max(w.snd_wnd - held, 0)))
