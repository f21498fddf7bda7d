"""Byte streams whose every byte is checkable: position-dependent content, so loss, duplication and reordering
all show up as a mismatch at a known offset."""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from sockrepair.lab.pattern import first_mismatch, pattern
from sockrepair.lab.subjects import start_echo, stop
from sockrepair.netns import NetNS
from tests.root.programs import free_port

__all__ = ["Echoing", "connect_clients", "echo_clients", "echo_round", "first_mismatch", "pattern", "recv_exactly",
           "send_until_full"]


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


Process = subprocess.Popen[bytes]


class Echoing(NamedTuple):
    """What echo_clients() yields. `stop_later(proc)` returns `proc` (None too), to be stopped after the program."""

    server: Process
    clients: list[socket.socket]
    offsets: list[int]
    stop_later: Callable[[Process | None], Process | None]


@contextmanager
def echo_clients(n: int, size: int, ns: NetNS | None = None) -> Iterator[Echoing]:
    """The echo program on 127.0.0.1 (in `ns`, default this namespace) and `n` clients, each of which has echoed
    `size` bytes of its stream (echo_round). On the way out the clients are closed, the program stopped, then each
    process given to stop_later (a receiver, a restored program) in that order."""
    with ns.entered() if ns is not None else contextlib.nullcontext():
        port = free_port()
    server = start_echo(f"127.0.0.1:{port}", netns=ns.name if ns is not None else None)
    later: list[Process | None] = []

    def stop_later(proc: Process | None) -> Process | None:
        later.append(proc)
        return proc

    clients: list[socket.socket] = []
    try:
        with ns.entered() if ns is not None else contextlib.nullcontext():
            clients += connect_clients(port, n)
        offsets = [0] * n
        echo_round(clients, offsets, size)
        yield Echoing(server, clients, offsets, stop_later)
    finally:
        for c in clients:
            c.close()
        stop(server)
        for proc in later:
            stop(proc)
