"""The buffers a checkpoint peeks its queues into, kept from one checkpoint to the next.

Memory the process has not touched yet costs a page fault per 4 KiB page the first time the kernel writes it: on the
2-vCPU VM of docs/benchmarks.md, 1 MiB peeked into fresh memory took about 1 ms against 0.25 ms into memory already
touched. So a queue of MIN_POOLED to MAX_POOLED bytes is peeked into a buffer of this thread's pool, and the state
holds a read-only view of it (ConnectionState.send_queue / recv_queue are Payload). Each buffer is an anonymous
mapping, touched when it is made. From HUGE_FROM bytes on it is a window that starts on a huge-page boundary, advised
MADV_HUGEPAGE: with transparent huge pages (enabled "always" or "madvise"), 1 MiB is written through one TLB entry
instead of 256, which took the two 1 MiB peeks of a cycle from about 150 us to 95 us on that VM (the kernel's side
is in its direct map, already huge); without them it is 4 KiB pages, touched, as before. A smaller queue gains little
from them, and a huge page costs its first user about 0.3 ms there (2 MiB zeroed in memory the VM had not yet
touched): its buffer is 4 KiB pages, populated by mmap.

A buffer is used again only once no view of it is alive any more: an mmap refuses to resize while any memoryview of
it (or of a slice of one) exists, which is what `_unviewed` asks with a resize to its own size (a no-op mremap), so
a state that is still held never sees its bytes change. While every buffer is held (a batch keeps all its states), a
queue is peeked into a new bytes object, as a small one always is.

Each thread keeps at most SLOTS buffers (the two queues of one checkpoint), each of at most MAX_POOLED bytes (a whole
number of huge pages from HUGE_FROM on): 8 MiB at most, held for the life of the thread."""

from __future__ import annotations

import mmap
import threading

from sockrepair.engine._ffi import ffi

MIN_POOLED = 64 << 10  # below, a few page faults cost less than the view and the bookkeeping
MAX_POOLED = 4 << 20
SLOTS = 2
HUGE_PAGE = 2 << 20  # the PMD size of x86-64 (4 KiB pages); elsewhere the alignment only costs address space
HUGE_FROM = 1 << 20
PAGE = mmap.PAGESIZE
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class _Buffer:
    """An anonymous mapping and the window of it that peeks write: `size` bytes from `start` (a huge-page boundary
    from HUGE_FROM bytes on)."""

    __slots__ = ("map", "size", "start")

    def __init__(self, length: int) -> None:
        if length < HUGE_FROM or _MADV_HUGEPAGE is None:
            self.size = -(-length // PAGE) * PAGE
            self.map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE)
            self.start = 0
            return
        self.size = -(-length // HUGE_PAGE) * HUGE_PAGE
        # one huge page more than the window, so that the window can start on a boundary; the slack is never touched
        self.map = mmap.mmap(-1, self.size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            # the whole mapping, so that it stays one VMA (mremap, which _unviewed calls, wants one)
            self.map.madvise(_MADV_HUGEPAGE)
        except OSError:
            pass  # a kernel built without transparent huge pages: 4 KiB pages serve as well
        address = ffi.from_buffer(self.map)
        self.start = -int(ffi.cast("uintptr_t", address)) % HUGE_PAGE
        ffi.release(address)
        # touched after the advice (populated before it, the pages would be 4 KiB ones): one fault per huge page
        window = memoryview(self.map)[self.start : self.start + self.size]
        for offset in range(0, self.size, PAGE):
            window[offset] = 0

    def window(self, length: int) -> memoryview:
        return memoryview(self.map)[self.start : self.start + length]


class _Pool(threading.local):
    def __init__(self) -> None:
        self.buffers: list[_Buffer] = []


_pool = _Pool()


def _unviewed(buf: _Buffer) -> bool:
    """Whether no memoryview of `buf` is alive: an mmap with exported buffers cannot be resized (BufferError). One
    that cannot be resized for any other reason counts as viewed, and so is never written again."""
    try:
        buf.map.resize(len(buf.map))
    except (BufferError, OSError, SystemError, TypeError, ValueError):
        return False
    return True


def take(length: int) -> memoryview | None:
    """A writable view of `length` bytes of a buffer of this thread's pool that no live view shows; None when
    `length` is outside MIN_POOLED..MAX_POOLED, every buffer is still viewed, or no mapping could be made."""
    if not MIN_POOLED <= length <= MAX_POOLED:
        return None
    buffers = _pool.buffers
    try:
        for i in range(len(buffers)):
            buf = buffers[i]
            if _unviewed(buf):
                if buf.size < length:
                    buf = buffers[i] = _Buffer(length)
                return buf.window(length)
        if len(buffers) < SLOTS:
            buf = _Buffer(length)
            buffers.append(buf)
            return buf.window(length)
    except OSError:
        return None  # mmap failed (ENOMEM): the caller reads into bytes of its own
    return None
