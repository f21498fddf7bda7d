"""The two queues: their sequence numbers, their bytes, and putting them back.

TCP_QUEUE_SEQ reports the sequence number after the LAST byte of the selected queue; the kernel only accepts a new
one on a closed socket with empty queues, so restore sets the sequence of the queue's FIRST byte and then refills."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from sockrepair.engine._ffi import lib
from sockrepair.engine._repair import select_queue
from sockrepair.engine._sockcall import IntCalls, peek, send_chunked
from sockrepair.errors import SocketCallError

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
    send_queue: bytes
    unsent_len: int
    recv_queue: bytes


def _read_once(fd: int, calls: IntCalls) -> QueueSnapshot | None:
    ioctl, get_u32, set_int = calls.ioctl, calls.get_u32, calls.set
    outq = ioctl(SIOCOUTQ, "SIOCOUTQ")
    inq = ioctl(SIOCINQ, "SIOCINQ")
    set_int(TCP, REPAIR_QUEUE, RECV_QUEUE, "TCP_REPAIR_QUEUE")
    recv_seq = get_u32(TCP, QUEUE_SEQ, "TCP_QUEUE_SEQ receive")
    recv_queue = peek(fd, inq, "receive queue")
    # Read while no queue is selected: with the send queue selected, any ACK that arrives makes the kernel mark
    # the whole send queue as sent (that is how repair-mode refills work), and SIOCOUTQNSD would then say 0.
    set_int(TCP, REPAIR_QUEUE, NO_QUEUE, "TCP_REPAIR_QUEUE")
    unsent = ioctl(SIOCOUTQNSD, "SIOCOUTQNSD")
    set_int(TCP, REPAIR_QUEUE, SEND_QUEUE, "TCP_REPAIR_QUEUE")
    send_seq = get_u32(TCP, QUEUE_SEQ, "TCP_QUEUE_SEQ send")
    send_queue = peek(fd, outq, "send queue")
    set_int(TCP, REPAIR_QUEUE, NO_QUEUE, "TCP_REPAIR_QUEUE")
    # the application is not reading or writing, so unchanged queue lengths mean unchanged queue edges
    if ioctl(SIOCOUTQ, "SIOCOUTQ") != outq or ioctl(SIOCINQ, "SIOCINQ") != inq:
        return None
    return QueueSnapshot(send_seq, recv_seq, send_queue, unsent, recv_queue)


def read_queues(fd: int, calls: IntCalls | None = None) -> QueueSnapshot:
    calls = calls or IntCalls(fd)
    for _ in range(SNAPSHOT_ATTEMPTS):
        try:
            snap = _read_once(fd, calls)
        except SocketCallError as exc:
            # a peek that came up short: the queue moved under us
            select_queue(fd, NO_QUEUE, calls)
            if exc.errno != errno.EAGAIN:
                raise
            snap = None
        if snap is not None:
            return snap
    raise SocketCallError(
        errno.EAGAIN, f"reading the queues: they kept changing over {SNAPSHOT_ATTEMPTS} tries (lock the peer out)", fd
    )


def set_sequences(fd: int, send_seq: int, send_len: int, recv_seq: int, recv_len: int,
                  calls: IntCalls | None = None) -> None:
    calls = calls or IntCalls(fd)
    set_int, set_u32 = calls.set, calls.set_u32
    set_int(TCP, REPAIR_QUEUE, SEND_QUEUE, "TCP_REPAIR_QUEUE")
    set_u32(TCP, QUEUE_SEQ, send_seq - send_len, "TCP_QUEUE_SEQ send")
    set_int(TCP, REPAIR_QUEUE, RECV_QUEUE, "TCP_REPAIR_QUEUE")
    set_u32(TCP, QUEUE_SEQ, recv_seq - recv_len, "TCP_QUEUE_SEQ receive")


def refill_in_repair(fd: int, recv_queue: bytes | memoryview, unacked: bytes | memoryview,
                     calls: IntCalls | None = None) -> None:
    """Bytes the application had not read yet, and bytes sent but not acknowledged: both must be put back while
    still in repair mode, where a send() appends to the selected queue without transmitting."""
    calls = calls or IntCalls(fd)
    if recv_queue:
        select_queue(fd, RECV_QUEUE, calls)
        send_chunked(fd, recv_queue, "refill receive queue")
    if unacked:
        select_queue(fd, SEND_QUEUE, calls)
        send_chunked(fd, unacked, "refill send queue (sent, unacknowledged)")
    select_queue(fd, NO_QUEUE, calls)


def write_unsent(fd: int, unsent: bytes | memoryview) -> None:
    """Never-sent bytes go in after repair is off: written in repair mode they would wait for a retransmission
    timeout (hundreds of ms) before leaving."""
    if unsent:
        send_chunked(fd, unsent, "write never-sent data")
