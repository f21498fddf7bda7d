"""Byte streams whose every byte is checkable: position-dependent content, so loss, duplication and reordering
all show up as a mismatch at a known offset."""

from __future__ import annotations

import hashlib
import select
import socket
import time


def pattern(offset: int, length: int, salt: int = 0) -> bytes:
    """Bytes [offset, offset+length) of an endless stream built from 32-byte sha256 blocks."""
    first = offset // 32
    blocks = b"".join(
        hashlib.sha256(f"{salt}:{i}".encode()).digest() for i in range(first, (offset + length + 31) // 32)
    )
    start = offset - first * 32
    return blocks[start : start + length]


def send_until_full(sock: socket.socket, offset: int, salt: int, limit: int, chunk: int = 65536) -> int:
    """Write the stream without blocking until the kernel takes no more (or `limit` bytes); returns the new offset."""
    while offset < limit:
        try:
            sent = sock.send(pattern(offset, min(chunk, limit - offset), salt), socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        offset += sent
    return offset


def recv_exactly(sock: socket.socket, length: int, timeout: float = 20.0) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < length:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out with {len(out)} of {length} bytes")
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            continue
        piece = sock.recv(min(1 << 20, length - len(out)))
        if not piece:
            raise AssertionError(f"EOF after {len(out)} of {length} bytes")
        out += piece
    return bytes(out)


def first_mismatch(got: bytes, want: bytes) -> int | None:
    if got == want:
        return None
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return min(len(got), len(want))
