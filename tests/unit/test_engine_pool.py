"""The peek buffers of engine/_pool.py: a buffer serves again only once no view of it is alive."""

from __future__ import annotations

import threading

from sockrepair.engine import _pool
from sockrepair.engine._ffi import ffi


def _fresh_pool() -> None:
    _pool._pool.buffers.clear()


def _address(view: memoryview) -> int:
    pointer = ffi.from_buffer(view)
    try:
        return int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)


def test_a_viewed_buffer_is_never_handed_out_again() -> None:
    _fresh_pool()
    first = _pool.take(1 << 20)
    assert first is not None and len(first) == 1 << 20 and not first.readonly
    owner = first.obj
    first[:3] = b"abc"
    view = first[:100].toreadonly()  # what a checkpoint's state holds
    del first
    second = _pool.take(1 << 20)
    assert second is not None and second.obj is not owner
    held = second[5:6]  # a slice of a view holds it as well
    del second
    assert _pool.take(1 << 20) is None  # both held: the caller reads into bytes of its own
    assert view[:3] == b"abc"
    del view
    again = _pool.take(1 << 20)
    assert again is not None and again.obj is owner and again[:3] == b"abc"  # the same memory, not a copy
    del again
    del held
    again = _pool.take(1 << 20)
    assert again is not None and again.obj is owner  # nothing took a view of it meanwhile
    del again
    assert len(_pool._pool.buffers) == _pool.SLOTS


def test_windows_from_huge_from_on_start_on_a_huge_page_boundary() -> None:
    # where the kernel gives transparent huge pages, a 1 MiB peek then writes through one TLB entry; a smaller queue
    # gets a mapping of its own size in 4 KiB pages
    _fresh_pool()
    windows = [_pool.take(_pool.HUGE_FROM), _pool.take(_pool.MAX_POOLED)]
    assert all(w is not None and _address(w) % _pool.HUGE_PAGE == 0 for w in windows)
    del windows
    _fresh_pool()
    small = _pool.take(_pool.HUGE_FROM - 1)
    assert small is not None and len(small) == _pool.HUGE_FROM - 1
    assert len(_pool._pool.buffers[0].map) == _pool.HUGE_FROM  # whole pages, no slack


def test_sizes_outside_the_pooled_range_get_none_and_a_buffer_grows() -> None:
    _fresh_pool()
    assert _pool.take(_pool.MIN_POOLED - 1) is None and _pool.take(_pool.MAX_POOLED + 1) is None
    small = _pool.take(_pool.MIN_POOLED)
    assert small is not None and len(small) == _pool.MIN_POOLED
    del small
    grown = _pool.take(_pool.MAX_POOLED)
    assert grown is not None and len(grown) == _pool.MAX_POOLED
    assert [buf.map for buf in _pool._pool.buffers] == [grown.obj]


def test_each_thread_has_its_own_pool() -> None:
    _fresh_pool()
    mine = _pool.take(1 << 20)
    theirs: list[memoryview | None] = []
    thread = threading.Thread(target=lambda: theirs.append(_pool.take(1 << 20)))
    thread.start()
    thread.join()
    assert mine is not None and theirs[0] is not None and theirs[0].obj is not mine.obj
    assert [buf.map for buf in _pool._pool.buffers] == [mine.obj]
