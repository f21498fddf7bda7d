"""The wire recorder on the peer's interface: a migration from A to B passes its checks, a closed, reset or broken
connection fails them."""

from __future__ import annotations

import fcntl
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

import sockrepair
from sockrepair.errors import WireError
from sockrepair.lab.analysis import WireReport, analyse
from sockrepair.lab.hosts import Host, Lab
from sockrepair.lab.pcap import read_segments
from sockrepair.lab.recorder import Recorder
from sockrepair.state import ConnTuple

T = TypeVar("T")
PORT = 7000
TIOCOUTQ = 0x5411


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as made:
        yield made


def in_host(host: Host, fn: Callable[[], T]) -> T:
    """Run fn on a fresh thread inside `host` (the way a restore on another machine would run)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            with host.entered():
                result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def connect(lab: Lab, family: int) -> tuple[socket.socket, socket.socket, ConnTuple]:
    """(peer's client, A's accepted socket, the tuple as the peer sees it) for a connection to the service on A."""
    addr = lab.service6 if family == socket.AF_INET6 else lab.service4
    with lab.a.entered():
        listener = socket.socket(family, socket.SOCK_STREAM)
    with lab.peer.entered():
        client = socket.socket(family, socket.SOCK_STREAM)
    with listener:
        listener.bind((addr, PORT))
        listener.listen(1)
        client.settimeout(10)
        client.connect((addr, PORT))
        server, _ = listener.accept()
    server.settimeout(10)
    local = client.getsockname()
    return client, server, ConnTuple(family, local[0], local[1], addr, PORT)


def transfer(src: socket.socket, dst: socket.socket, data: bytes) -> None:
    src.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        chunk = dst.recv(1 << 16)
        assert chunk, "connection closed"
        got += chunk
    assert bytes(got) == data


def unacked(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), TIOCOUTQ, b"\0" * 4))[0]


def quiesce(*socks: socket.socket) -> None:
    """Until everything each socket sent is acknowledged: nothing left in flight that could meet a missing socket
    (no lock here) or be retransmitted."""
    while any(unacked(s) for s in socks):
        time.sleep(0.001)


def traffic(client: socket.socket, server: socket.socket, tag: bytes) -> None:
    transfer(client, server, tag * 150_000)
    transfer(server, client, tag.lower() * 90_000)
    quiesce(client, server)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_migration_a_to_b_is_clean_on_the_wire(lab: Lab, family: int, tmp_path: Path) -> None:
    client, server, conn = connect(lab, family)
    with client:
        with Recorder(lab.peer.ifname, lab.peer.name) as rec:
            traffic(client, server, b"A")
            freeze = time.time()
            state = sockrepair.checkpoint(server)
            sockrepair.discard(server, state)
            lab.move_service("a", "b")
            moved = in_host(lab.b, lambda: sockrepair.restore(state))
            resume = time.time()
            traffic(client, moved, b"B")
            transfer(client, moved, b"last")
            quiesce(client, moved)
        moved.close()  # after the recording: its FIN is not part of the migration
        report = rec.report(conn, freeze, resume)
        assert report.ok, report.problems
        out, back = report.directions
        assert out.holes == [] and back.holes == []
        assert (out.bytes, back.bytes) == (2 * 150_000 + 4, 2 * 90_000)  # every byte sent was on the wire
        assert report.wire_gap is not None and report.wire_gap.seconds is not None
        assert report.wire_gap.last_before is not None and report.wire_gap.last_before <= freeze
        assert report.wire_gap.first_after is not None and report.wire_gap.first_after >= resume
        # offloads are off: what the capture holds are wire-sized frames, not 64 KiB aggregates
        assert max(len(f.data) for f in rec.frames) <= 1514

        saved = tmp_path / "migration.pcap"
        rec.write_pcap(saved)
        again = analyse(read_segments(saved), conn.reversed(), freeze, resume)
        assert again.ok and again.segments == report.segments


def run_and_record(lab: Lab, family: int, ending: Callable[[socket.socket, socket.socket], None]) -> WireReport:
    client, server, conn = connect(lab, family)
    with client, server:
        with Recorder(lab.peer.ifname, lab.peer.name) as rec:
            traffic(client, server, b"x")
            ending(client, server)
    return rec.report(conn)


def close_normally(client: socket.socket, server: socket.socket) -> None:
    server.close()
    assert client.recv(10) == b""
    client.close()
    time.sleep(0)


def reset(client: socket.socket, server: socket.socket) -> None:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    with pytest.raises(ConnectionResetError):
        client.recv(10)


def test_fin_is_reported(lab: Lab) -> None:
    report = run_and_record(lab, socket.AF_INET, close_normally)
    assert not report.ok
    assert [d.fin for d in report.directions] == [1, 1]
    assert any("FIN" in p for p in report.problems)


def test_rst_is_reported(lab: Lab) -> None:
    report = run_and_record(lab, socket.AF_INET6, reset)
    assert not report.ok
    assert report.directions[1].rst == 1
    assert any("RST" in p for p in report.problems)


def test_peer_talking_to_a_vanished_socket_is_caught(lab: Lab) -> None:
    """A migration done wrong (socket gone, service not moved, peer not quiet): A answers with RST."""

    def vanish(client: socket.socket, server: socket.socket) -> None:
        sockrepair.discard(server, sockrepair.checkpoint(server))
        client.sendall(b"anyone there?")
        with pytest.raises(ConnectionResetError):
            client.recv(10)

    report = run_and_record(lab, socket.AF_INET, vanish)
    assert not report.ok
    assert report.directions[1].rst >= 1


def test_recorder_on_a_missing_interface(lab: Lab) -> None:
    with pytest.raises(WireError, match="cannot capture on nosuch0"):
        Recorder("nosuch0", lab.peer.name).start()
