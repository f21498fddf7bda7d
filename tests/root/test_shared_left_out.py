"""A connection the program shares with a child, left out of a move (wanted=), is not lost when the program ends:
the child holds it. The refusal of shared connections says to leave them out (wanted=...); the check for
connections lost with the process must then let the move go on, moving the rest (before, it refused the shared one
as closed or reset by the end of the process, which the child's copy prevents)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import sockrepair
from sockrepair.move.procfs import tcp_sockets

# accepts two connections, forks a child that echoes on the first, keeps both open itself and echoes on the second
PROGRAM = r"""
import os, socket, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(2)
print(listener.getsockname()[1], flush=True)
shared, _ = listener.accept()
own, _ = listener.accept()
listener.close()
child = os.fork()
if child == 0:
    own.close()
    while True:
        data = shared.recv(65536)
        if not data:
            os._exit(0)
        shared.sendall(data)
print(child, shared.fileno(), own.fileno(), flush=True)
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


def test_a_shared_connection_left_out_stays_with_the_child(netns: object, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, text=True)
    child = 0
    moved: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            child, shared_fd, own_fd = map(int, proc.stdout.readline().split())
            assert _echo(first, b"shared before") == b"shared before"
            second.sendall(b"unread by the program")
            own_tuple = next(s.tuple for s in tcp_sockets(proc.pid) if s.fd == own_fd)

            def handoff(socks: list[socket.socket], tuples: list[object]) -> None:
                moved.extend(s.dup() for s in socks)  # migrate() closes its own copies after the handoff

            report = sockrepair.migrate(proc.pid, wanted=[own_fd], handoff=handoff, journal=tmp_path / "j")
            assert report.connections == [str(own_tuple)]
            assert proc.wait(timeout=10) == -signal.SIGKILL
            # the moved one has what the peer sent, and carries on
            assert len(moved) == 1
            moved[0].settimeout(10)
            assert moved[0].recv(100) == b"unread by the program"
            moved[0].sendall(b"from the restored socket")
            assert second.recv(100) == b"from the restored socket"
            # the shared one is still served by the child, untouched
            assert _echo(first, b"shared after" * 1000) == b"shared after" * 1000
            assert sockrepair.list_locks() == []
            assert shared_fd != own_fd
    finally:
        for s in moved:
            s.close()
        if child:
            os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.wait()
