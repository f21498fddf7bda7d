"""The peer-gap helpers for real, on loopback only: the ping-pong client and the receiver that takes sockets over
a UNIX socket, in their own processes; and the client catching a wrong echo."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from sockrepair.lab.subjects import PingPongClient, RequestClient, start_receiver, stop
from sockrepair.move.handoff import send_over_unix
from sockrepair.state import ConnTuple


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


@pytest.mark.parametrize("mode", ["requests", "stream"])
def test_the_request_client_times_every_request_through_the_receiver(tmp_path: Path, listener: socket.socket,
                                                                     mode: str) -> None:
    path = tmp_path / "receiver.sock"
    receiver = start_receiver(path, max_seconds=60)
    try:
        def give(conn: socket.socket) -> None:
            tup = ConnTuple(socket.AF_INET, *conn.getsockname(), *conn.getpeername())
            send_over_unix(str(path), [conn], [tup])
            conn.close()

        thread = _serve(listener, 4, give)
        client = RequestClient("127.0.0.1", listener.getsockname()[1], 4, mode=mode, interval=0.005,
                               size=64 if mode == "requests" else 512, timeout=10, max_seconds=60, seed=7)
        thread.join(10)
        time.sleep(0.3)
        report = client.stop()
    finally:
        stop(receiver)
    assert report["errors"] == [] and report["swept"] and report["mode"] == mode
    assert len(report["ports"]) == 4 and sum(report["histogram"]["counts"]) == report["requests"]
    if mode == "requests":
        # every answered request was timed and every byte of it checked, the setup's and the sweep's requests too
        assert report["requests"] > 20 and report["bytes_verified"] == 64 * (report["requests"] + 8)
        assert report["over_200ms"] == sum(report["histogram"]["counts"][-5:])
    else:
        assert report["bytes_verified"] > 512 * 20 and report["longest_pause"][1] > 0


def test_the_request_client_reports_a_wrong_echo_at_its_stream_offset(listener: socket.socket) -> None:
    def garble_later(conn: socket.socket) -> None:
        conn.sendall(conn.recv(64))  # the setup's request comes back right
        data = conn.recv(64)
        conn.sendall(data[:10] + bytes([data[10] ^ 1]) + data[11:])
        time.sleep(2)
        conn.close()

    thread = _serve(listener, 1, garble_later)
    client = RequestClient("127.0.0.1", listener.getsockname()[1], 1, interval=0.01, timeout=5, max_seconds=30)
    time.sleep(0.3)
    report = client.stop()
    thread.join(10)
    assert not report["swept"] and any("wrong byte at stream offset 74" in e for e in report["errors"])
