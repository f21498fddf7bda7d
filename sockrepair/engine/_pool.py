"""The buffers a checkpoint peeks its queues into, kept from one checkpoint to the next.

Memory the process has not touched yet costs a page fault per 4 KiB page the first time the kernel writes it: on the
2-vCPU VM of docs/benchmarks.md, 1 MiB peeked into fresh memory took about 1 ms against 0.25 ms into memory already
touched. So a queue of MIN_POOLED to MAX_POOLED bytes is peeked into a buffer of this thread's pool, and the state
holds a read-only view of it (ConnectionState.send_queue / recv_queue are Payload). A buffer is used again only once
no view of it is alive any more: a bytearray refuses to change size while any memoryview of it (or of a slice of it)
exists, which is what `_unviewed` asks, so a state that is still held never sees its bytes change. While every
buffer is held (a batch keeps all its states), a queue is peeked into a new bytes object, as a small one always is.

Each thread keeps at most SLOTS buffers (the two queues of one checkpoint) of at most MAX_POOLED bytes: 8 MiB at
most, held for the life of the thread."""

from __future__ import annotations

import threading

MIN_POOLED = 64 << 10  # below, a few page faults cost less than the view and the bookkeeping
MAX_POOLED = 4 << 20
SLOTS = 2


class _Pool(threading.local):
    def __init__(self) -> None:
        self.buffers: list[bytearray] = []


_pool = _Pool()


def _unviewed(buf: bytearray) -> bool:
    """Whether no memoryview of `buf` is alive: a bytearray with exported buffers cannot change size."""
    try:
        last = buf.pop()
    except BufferError:
        return False
    buf.append(last)  # within the allocation the pop left: no reallocation
    return True


def take(length: int) -> bytearray | None:
    """A buffer of this thread's pool of at least `length` bytes, none of whose bytes any live view shows; None when
    `length` is outside MIN_POOLED..MAX_POOLED or every buffer is still viewed."""
    if not MIN_POOLED <= length <= MAX_POOLED:
        return None
    buffers = _pool.buffers
    for i in range(len(buffers)):
        buf = buffers[i]
        if _unviewed(buf):
            if len(buf) < length:
                buf = buffers[i] = bytearray(length)
            return buf
    if len(buffers) < SLOTS:
        buf = bytearray(length)
        buffers.append(buf)
        return buf
    return None
