"""The peer-gap helpers for real, on loopback only: the ping-pong client and the receiver that takes sockets over
a UNIX socket, in their own processes; and the client catching a wrong echo."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockrepair.lab.subjects import PingPongClient, start_receiver, stop
from sockrepair.move.handoff import send_over_unix
from sockrepair.state import ConnTuple


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s


def _serve(listener: socket.socket, count: int, take: callable) -> threading.Thread:  # type: ignore[valid-type]
    def accept_all() -> None:
        for _ in range(count):
            conn, _ = listener.accept()
            take(conn)

    thread = threading.Thread(target=accept_all, daemon=True)
    thread.start()
    return thread


def test_the_client_checks_every_round_through_the_receiver(tmp_path: Path, listener: socket.socket) -> None:
    path = tmp_path / "receiver.sock"
    receiver = start_receiver(path, max_seconds=60)
    try:
        def give(conn: socket.socket) -> None:
            tup = ConnTuple(socket.AF_INET, *conn.getsockname(), *conn.getpeername())
            send_over_unix(str(path), [conn], [tup])
            conn.close()

        thread = _serve(listener, 3, give)
        client = PingPongClient("127.0.0.1", listener.getsockname()[1], 3, round_timeout=10, max_seconds=60)
        thread.join(10)
        time.sleep(0.2)
        report = client.stop(sweep_timeout=10)
    finally:
        stop(receiver)
    assert report["errors"] == [] and report["swept"]
    # one untimed round per connection at setup; every other round, the final check of each included, is timed
    assert report["rounds"] > 6 and report["bytes_verified"] == 64 * (report["rounds"] + 3)


def test_a_wrong_echo_is_an_error_not_a_round(listener: socket.socket) -> None:
    def garble(conn: socket.socket) -> None:
        data = conn.recv(64)
        conn.sendall(bytes([data[0] ^ 1]) + data[1:])
        conn.close()

    thread = _serve(listener, 1, garble)
    with pytest.raises(Exception, match="could not connect: .*wrong byte 0"):
        PingPongClient("127.0.0.1", listener.getsockname()[1], 1, round_timeout=10, max_seconds=60)
    thread.join(10)
