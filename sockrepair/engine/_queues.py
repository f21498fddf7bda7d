"""The two queues: their sequence numbers, their bytes, and putting them back.

TCP_QUEUE_SEQ reports the sequence number after the LAST byte of the selected queue; the kernel only accepts a new
one on a closed socket with empty queues, so restore sets the sequence of the queue's FIRST byte and then refills."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from sockrepair.engine._ffi import lib
from sockrepair.engine._session import _Session
from sockrepair.engine._states import send_lengths
from sockrepair.errors import SocketCallError
from sockrepair.state import Payload

TCP = lib.IPPROTO_TCP
REPAIR_QUEUE, QUEUE_SEQ = lib.TCP_REPAIR_QUEUE, lib.TCP_QUEUE_SEQ
NO_QUEUE, RECV_QUEUE, SEND_QUEUE = lib.TCP_NO_QUEUE, lib.TCP_RECV_QUEUE, lib.TCP_SEND_QUEUE
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = lib.SIOCINQ, lib.SIOCOUTQ, lib.SIOCOUTQNSD
# Reading the queues races with ACKs and data that still arrive when no lock holds the peer off; a snapshot is taken
# again when the sequence numbers moved while it was read.
SNAPSHOT_ATTEMPTS = 50


@dataclass
class QueueSnapshot:
    send_seq: int
    recv_seq: int
    send_queue: Payload
    unsent_len: int
    recv_queue: Payload


def _read_once(session: _Session, tcp_state: int, inq: int) -> QueueSnapshot | None:
    """One snapshot; `inq` is SIOCINQ when read already in repair mode (the final check covers it), else -1."""
    ioctl, get_u32, set_int, peek = session.ioctl, session.get_u32, session.set, session.peek
    raw_outq = ioctl(SIOCOUTQ, "SIOCOUTQ")
    if inq < 0:
        inq = ioctl(SIOCINQ, "SIOCINQ")
    set_int(TCP, REPAIR_QUEUE, RECV_QUEUE, "TCP_REPAIR_QUEUE")
    recv_seq = get_u32(TCP, QUEUE_SEQ, "TCP_QUEUE_SEQ receive")
    recv_queue = peek(inq, "receive queue")
    # Read while the send queue is not selected: with it selected, any ACK that arrives makes the kernel mark the
    # whole send queue as sent (that is how repair-mode refills work: tcp_write_xmit looks at no other queue),
    # and SIOCOUTQNSD would then say 0. The receive queue selected is as good as none.
    outq, unsent = send_lengths(tcp_state, raw_outq, ioctl(SIOCOUTQNSD, "SIOCOUTQNSD"))
    set_int(TCP, REPAIR_QUEUE, SEND_QUEUE, "TCP_REPAIR_QUEUE")
    send_seq = get_u32(TCP, QUEUE_SEQ, "TCP_QUEUE_SEQ send")
    send_queue = peek(outq, "send queue")
    set_int(TCP, REPAIR_QUEUE, NO_QUEUE, "TCP_REPAIR_QUEUE")
    # the application is not reading or writing, so unchanged queue lengths mean unchanged queue edges
    if ioctl(SIOCOUTQ, "SIOCOUTQ") != raw_outq or ioctl(SIOCINQ, "SIOCINQ") != inq:
        return None
    return QueueSnapshot(send_seq, recv_seq, send_queue, unsent, recv_queue)


def read_queues(session: _Session, tcp_state: int, inq: int = -1) -> QueueSnapshot:
    """Both queues' sequence numbers and bytes, and how much of the send queue was never sent (SIOCOUTQNSD), in
    repair mode; lengths leave our FIN out (engine/_states.py), sequence numbers are the kernel's. `inq`: SIOCINQ
    when the caller read it in repair mode (-1: not read). SocketCallError (EAGAIN) when the queues kept changing
    over SNAPSHOT_ATTEMPTS tries."""
    for _ in range(SNAPSHOT_ATTEMPTS):
        try:
            snap = _read_once(session, tcp_state, inq)
        except SocketCallError as exc:
            # a peek that came up short: the queue moved under us
            session.select_queue(NO_QUEUE)
            if exc.errno != errno.EAGAIN:
                raise
            snap = None
        inq = -1
        if snap is not None:
            return snap
    raise session.fail(f"reading the queues: they kept changing over {SNAPSHOT_ATTEMPTS} tries (lock the peer out)",
                       errno.EAGAIN)


def set_sequences(session: _Session, send_seq: int, send_len: int, recv_seq: int, recv_len: int) -> None:
    """TCP_QUEUE_SEQ of both queues, as the sequence of each queue's FIRST byte (`*_seq` is the one after its last,
    `*_len` its length)."""
    set_int, set_u32 = session.set, session.set_u32
    set_int(TCP, REPAIR_QUEUE, SEND_QUEUE, "TCP_REPAIR_QUEUE")
    set_u32(TCP, QUEUE_SEQ, send_seq - send_len, "TCP_QUEUE_SEQ send")
    set_int(TCP, REPAIR_QUEUE, RECV_QUEUE, "TCP_REPAIR_QUEUE")
    set_u32(TCP, QUEUE_SEQ, recv_seq - recv_len, "TCP_QUEUE_SEQ receive")


def refill_in_repair(session: _Session, recv_queue: bytes | memoryview, unacked: bytes | memoryview) -> None:
    """Bytes the application had not read yet, and bytes sent but not acknowledged: both must be put back while
    still in repair mode, where a send() appends to the selected queue without transmitting."""
    if recv_queue:
        session.select_queue(RECV_QUEUE)
        session.send_all(recv_queue, "refill receive queue")
    if unacked:
        session.select_queue(SEND_QUEUE)
        session.send_all(unacked, "refill send queue (sent, unacknowledged)")
    if recv_queue or unacked:
        session.select_queue(NO_QUEUE)
    # else set_sequences left the receive queue selected, as harmless as none: repair mode writes nothing more
    # before it is switched on again (which deselects), off, or a queue selected (engine/_states.py _shutdown)


def write_unsent(session: _Session, unsent: bytes | memoryview) -> None:
    """Never-sent bytes go in after repair is off: written in repair mode they would wait for a retransmission
    timeout (hundreds of ms) before leaving."""
    if unsent:
        session.send_all(unsent, "write never-sent data")
