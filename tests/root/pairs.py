"""Connected pairs and what their TCP_INFO says, for the lock's root tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.state import ConnTuple

TCP_REPAIR = 19
TCP_ESTABLISHED = 1


def tcp_info(sock: socket.socket) -> tuple[int, int, int]:
    """(state, probes, total_retrans) from struct tcp_info."""
    state, probes, total_retrans = tcpinfo.read(sock, "tcpi_state", "tcpi_probes", "tcpi_total_retrans")
    return state, probes, total_retrans


def wait_for(cond: Callable[[], bool], what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def tuple_of(sock: socket.socket) -> ConnTuple:
    local, remote = sock.getsockname(), sock.getpeername()
    return ConnTuple(sock.family, local[0], local[1], remote[0], remote[1])


def vanish(sock: socket.socket) -> None:
    """What a migration does to the old socket: closed in repair mode, it leaves without FIN or RST."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.close()


def loopback_pair(family: int, listen_addr: str, connect_addr: str) -> tuple[socket.socket, socket.socket]:
    with socket.socket(family) as listener:
        listener.bind((listen_addr, 0))
        listener.listen()
        client = socket.socket(socket.AF_INET6 if ":" in connect_addr else socket.AF_INET)
        client.connect((connect_addr, listener.getsockname()[1]))
        server, _ = listener.accept()
    return client, server


def assert_alive_and_silent(sock: socket.socket) -> None:
    assert tcp_info(sock)[0] == TCP_ESTABLISHED
    with pytest.raises(BlockingIOError):
        sock.recv(1, socket.MSG_DONTWAIT)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(30)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


FAMILIES = [
    pytest.param(socket.AF_INET, "127.0.0.1", "127.0.0.1", id="ipv4"),
    pytest.param(socket.AF_INET6, "::1", "::1", id="ipv6"),
    pytest.param(socket.AF_INET6, "::", "127.0.0.1", id="v4-mapped"),
]
