"""Checkable byte streams: the content at each offset is fixed by (salt, offset), so a receiver can tell loss,
duplication and reordering apart from delay, at the exact offset where they happen."""

from __future__ import annotations

import hashlib


def pattern(offset: int, length: int, salt: int = 0) -> bytes:
    """Bytes [offset, offset+length) of an endless stream built from 32-byte sha256 blocks."""
    first = offset // 32
    blocks = b"".join(
        hashlib.sha256(f"{salt}:{i}".encode()).digest() for i in range(first, (offset + length + 31) // 32)
    )
    start = offset - first * 32
    return blocks[start : start + length]


def first_mismatch(got: bytes | bytearray | memoryview, want: bytes | bytearray | memoryview) -> int | None:
    """Offset of the first differing byte (or of the shorter end), None when equal."""
    if got == want:
        return None
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return min(len(got), len(want))
