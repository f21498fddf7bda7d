"""Helpers for the criu tests whose program (a `python -c` script) holds one connection to the test's own peer
socket and reports through files next to its `ready` path."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sockrepair.move.procfs import tcp_sockets
from sockrepair.netns import NetNS


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`sockrepair ARGS...` run to its end (120 s at most), its output captured as text."""
    return subprocess.run([sys.executable, "-m", "sockrepair.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def wait_for_states(pid: int, states: list[str]) -> None:
    """Until the TCP sockets of `pid` are in `states` (tcp_sockets' order), 10 s at most."""
    deadline = time.monotonic() + 10
    while [s.state_name for s in tcp_sockets(pid)] != states:
        assert time.monotonic() < deadline, tcp_sockets(pid)
        time.sleep(0.01)


@contextlib.contextmanager
def connected_program(ns: NetNS, program: str, ready: Path) -> Iterator[tuple[socket.socket, subprocess.Popen[bytes]]]:
    """`python -c program PORT READY` started in `ns` in a session of its own (as criu dumps it), connected to a
    listener of this test in `ns`; yields (the accepted peer socket, the program) once `ready` exists. On the way
    out the peer and the listener are closed and the program (or the one restored with its pid) is killed."""
    with ns.entered():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        proc = subprocess.Popen([sys.executable, "-c", program, str(listener.getsockname()[1]), str(ready)],
                                stdin=subprocess.DEVNULL, start_new_session=True)
    peer, _ = listener.accept()
    try:
        wait_for_file(ready)
        yield peer, proc
    finally:
        peer.close()
        listener.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)  # the restored program has the same pid
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            proc.wait(10)
