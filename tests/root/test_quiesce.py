"""A request the program had read but not yet answered: the freeze waits for a point where every thread waits, and a
program that stays busy is refused (nothing moved, the request answered later) or moved anyway and reported."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import sockrepair
from sockrepair.lab.subjects import start_echo, stop
from sockrepair.move.dump import After, dump
from sockrepair.move.procfs import stat
from sockrepair.move.quiesce import OnBusy, Quiescence
from tests.root.pairs import wait_for
from tests.root.programs import free_port
from tests.root.streams import recv_exactly

# Reads a request, then works on it (here: spins) until FLAG exists, then answers; prints "got" once it has read it.
SLOW_SERVER = """
import os, socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(1)
print("ready", flush=True)
conn, _ = listener.accept()
while True:
    request = conn.recv(100)
    if not request:
        break
    print("got", flush=True)
    while not os.path.exists(sys.argv[2]):
        pass
    os.unlink(sys.argv[2])
    conn.sendall(b"answer to " + request)
"""


def _slow_server(port: int, flag: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(port), str(flag)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


@contextmanager
def _busy(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket, Path]]:
    """SLOW_SERVER with one client whose b"request 1" it has read and works on until the flag file exists: yields
    (the server, the client, the flag's path); closes the client and stops the server afterwards."""
    port = free_port()
    flag = tmp_path / "answer-now"
    server = _slow_server(port, flag)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        client.sendall(b"request 1")
        assert server.stdout is not None and server.stdout.readline() == b"got\n"
        yield server, client, flag
    finally:
        client.close()
        stop(server)


def _running(pid: int) -> bool:
    st = stat(pid)
    return st is not None and st.state not in ("T", "t")


def test_an_idle_program_is_caught_waiting_at_once(netns, tmp_path):
    port = free_port()
    server = start_echo(f"127.0.0.1:{port}")
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        report = dump(server.pid, tmp_path / "img", after=After.LEAVE_RUNNING)
        assert report.quiescent and report.freeze_attempts == 1 and report.busy == []
        assert report.freeze_method == "ptrace"
    finally:
        client.close()
        stop(server)


def test_a_program_busy_with_a_request_is_refused_then_answers(netns, tmp_path):
    with _busy(tmp_path) as (server, client, flag):
        with pytest.raises(sockrepair.ProcessError, match="stayed busy") as caught:
            dump(server.pid, tmp_path / "img", quiescence=Quiescence(0.2, OnBusy.REFUSE))
        assert caught.value.pid == server.pid and "nothing was moved" in str(caught.value)
        assert server.poll() is None and _running(server.pid)
        assert sockrepair.list_locks() == []
        assert not (tmp_path / "img" / "index.json").exists()
        flag.touch()
        assert recv_exactly(client, len(b"answer to request 1")) == b"answer to request 1"


def test_moving_a_busy_program_anyway_reports_it(netns, tmp_path):
    with _busy(tmp_path) as (server, client, _):
        report = dump(server.pid, tmp_path / "img", quiescence=Quiescence(0.1, OnBusy.MOVE))
        assert not report.quiescent and report.freeze_attempts >= 2
        assert report.busy and all("thread" in b for b in report.busy)
        assert server.wait(10) == -signal.SIGKILL
        # the request had left the kernel's queue: the image holds no byte of it
        from sockrepair.image.directory import read_dir

        ((_, state),) = read_dir(tmp_path / "img")
        assert state.recv_queue == b""
        sockrepair.unlock_all()


def test_the_cli_says_when_it_moved_a_busy_program(netns, tmp_path):
    with _busy(tmp_path) as (server, client, _):
        refused = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "dump", "--pid", str(server.pid),
                                  "-D", str(tmp_path / "a"), "--quiesce-timeout", "0.1"], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 1 and "stayed busy" in refused.stderr
        wait_for(lambda: _running(server.pid), "the program to go on")
        moved = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "dump", "--pid", str(server.pid),
                                "-D", str(tmp_path / "b"), "--quiesce-timeout", "0.1", "--busy", "move"],
                               capture_output=True, text=True, timeout=60)
        assert moved.returncode == 0, moved.stderr
        assert "warning: moved while busy" in moved.stdout and "is lost" in moved.stdout
        sockrepair.unlock_all()


def test_a_thread_just_back_from_a_read_is_busy():
    """/proc shows read() for a thread stopped on its way back from a read that returned data, as for one blocked
    in it: the registers tell them apart, and a thread holding what it just read is not between requests."""
    from sockrepair.move.freeze import Freezer
    from sockrepair.move.quiesce import busy_threads

    reader = subprocess.Popen([sys.executable, "-c",
                               "import os\nfd = os.open('/dev/zero', os.O_RDONLY)\nwhile True:\n    os.read(fd, 1)"])
    try:
        wait_for(lambda: stat(reader.pid) is not None and stat(reader.pid).state == "R", "the reader to run")
        with Freezer(reader.pid) as freezer:
            for _ in range(20):
                with freezer.frozen() as method:
                    assert method == "ptrace"
                    busy = busy_threads(reader.pid, freezer.active)
                    assert [b.tid for b in busy] == [reader.pid]
    finally:
        reader.kill()
        reader.wait()
