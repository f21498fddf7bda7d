"""A connection the program shares with a process sockrepair does not freeze (a child that inherited it) is refused
before anything is frozen: moving it would disconnect the socket under the child, which goes on serving it (the
break-it pass found the child's writes failing with EPIPE after such a move, the connection gone from under it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sockrepair
from sockrepair.errors import SocketStateError
from sockrepair.move.dump import dump
from sockrepair.move.procfs import stat

# accepts one connection, forks a child that echoes on it, and keeps the connection open itself too
PROGRAM = r"""
import os, socket, time
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
child = os.fork()
if child == 0:
    while True:
        data = conn.recv(65536)
        if not data:
            os._exit(0)
        conn.sendall(data)
print(child, flush=True)
time.sleep(600)
"""


def _echo(client: socket.socket, payload: bytes) -> bytes:
    client.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = client.recv(65536)
        assert chunk, "the connection ended"
        got += chunk
    return got


@pytest.mark.parametrize("mover", ["migrate", "dump"])
def test_a_connection_a_child_shares_is_refused_before_the_freeze(netns: object, tmp_path: Path, mover: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            child = int(proc.stdout.readline())
            assert _echo(client, b"before") == b"before"
            with pytest.raises(SocketStateError, match=rf"shares 1 connection\(s\) with processes sockrepair does "
                               rf"not freeze: fd \d+ \(127\.0\.0\.1:{port}->.*\) is open in process {child} ") as err:
                if mover == "migrate":
                    sockrepair.migrate(proc.pid, journal=tmp_path / "j")
                else:
                    dump(proc.pid, tmp_path / "j")
            assert err.value.pid == proc.pid and err.value.tuple is not None and err.value.tuple.local_port == port
            # nothing was touched: both processes run, the child still serves the connection, nothing is locked
            parent_state = stat(proc.pid)
            assert proc.poll() is None and parent_state is not None and parent_state.state != "T"
            assert _echo(client, b"after the refusal" * 100) == b"after the refusal" * 100
            assert sockrepair.list_locks() == []
            assert not (tmp_path / "j").exists() or not any((tmp_path / "j").iterdir())
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.wait()
