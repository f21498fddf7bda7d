"""Byte streams whose every byte is checkable: position-dependent content, so loss, duplication and reordering
all show up as a mismatch at a known offset."""

from __future__ import annotations

import select
import socket
import time

from sockrepair.lab.pattern import first_mismatch, pattern

__all__ = ["connect_clients", "echo_round", "first_mismatch", "pattern", "recv_exactly", "send_until_full"]


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


def connect_clients(port: int, n: int, addr: str = "127.0.0.1") -> list[socket.socket]:
    """`n` connections to an echo program on ADDR:`port`."""
    return [socket.create_connection((addr, port), timeout=10) for _ in range(n)]


def echo_round(clients: list[socket.socket], offsets: list[int], size: int) -> None:
    """Send `size` bytes of each client's own stream (salt = its index) from its offset and check the echo; the
    offsets move on."""
    for i, c in enumerate(clients):
        data = pattern(offsets[i], size, salt=i)
        c.sendall(data)
        assert recv_exactly(c, size) == data, f"connection {i} echoed wrong bytes at offset {offsets[i]}"
        offsets[i] += size
