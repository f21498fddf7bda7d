"""The peek buffers of engine/_pool.py: a buffer serves again only once no view of it is alive."""

from __future__ import annotations

import threading

from sockrepair.engine import _pool


def _fresh_pool() -> None:
    _pool._pool.buffers.clear()


def test_a_viewed_buffer_is_never_handed_out_again() -> None:
    _fresh_pool()
    first = _pool.take(1 << 20)
    assert first is not None and len(first) == 1 << 20
    view = memoryview(first)[:100].toreadonly()  # what a checkpoint's state holds
    second = _pool.take(1 << 20)
    assert second is not None and second is not first
    held = memoryview(second)[5:6]  # a slice of a view holds it as well
    assert _pool.take(1 << 20) is None  # both held: the caller reads into bytes of its own
    del view
    assert _pool.take(1 << 20) is first
    del held
    assert _pool.take(1 << 20) is first  # nothing took a view of it meanwhile
    assert len(_pool._pool.buffers) == _pool.SLOTS


def test_sizes_outside_the_pooled_range_get_none_and_a_buffer_grows() -> None:
    _fresh_pool()
    assert _pool.take(_pool.MIN_POOLED - 1) is None and _pool.take(_pool.MAX_POOLED + 1) is None
    small = _pool.take(_pool.MIN_POOLED)
    assert small is not None and len(small) == _pool.MIN_POOLED
    grown = _pool.take(_pool.MAX_POOLED)
    assert grown is not None and len(grown) == _pool.MAX_POOLED and _pool._pool.buffers == [grown]


def test_each_thread_has_its_own_pool() -> None:
    _fresh_pool()
    mine = _pool.take(1 << 20)
    theirs: list[object] = []
    thread = threading.Thread(target=lambda: theirs.append(_pool.take(1 << 20)))
    thread.start()
    thread.join()
    assert theirs[0] is not None and theirs[0] is not mine
    assert _pool._pool.buffers == [mine]
