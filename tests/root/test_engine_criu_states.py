"""criu restores a half-closed connection under sockrepair's lock: libsoccr re-creates the peer's ACK of our FIN as
a packet marked SOCCR_MARK, which the lock lets through (docs/criu-errors.md `fin-packet` when something drops it).
`sockrepair criu dump` locks the connection although it is not ESTABLISHED."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sockrepair.move.procfs import tcp_sockets

# Connects, shuts its sending side (FIN_WAIT2 once the peer acknowledges), then records all it receives until EOF.
PROGRAM = r"""
import os, socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.shutdown(socket.SHUT_WR)
open(sys.argv[2], "w").write("ready")
data = b""
while chunk := c.recv(100):
    data += chunk
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(repr(data))
os.replace(sys.argv[2] + ".tmp", sys.argv[2] + ".got")
time.sleep(600)
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sockrepair.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_criu_moves_a_fin_wait2_connection(criu, ns, work: Path) -> None:
    ready = work / "program.ready"
    with ns.entered():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        program = subprocess.Popen([sys.executable, "-c", PROGRAM, str(listener.getsockname()[1]), str(ready)],
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    peer, _ = listener.accept()
    pid = program.pid
    try:
        _wait_for(ready)
        deadline = time.monotonic() + 10
        while [s.state_name for s in tcp_sockets(pid)] != ["FIN_WAIT2"]:
            assert time.monotonic() < deadline, tcp_sockets(pid)
            time.sleep(0.01)
        with ns.entered():
            dumped = _cli("criu", "dump", "--pid", str(pid), "-D", str(work / "dump"), "--allow-external-peers")
        assert dumped.returncode == 0, dumped.stderr
        assert "1 connection(s) locked" in dumped.stdout
        program.wait(10)  # criu ended it: reap it, or its pid stays taken
        with ns.entered():
            restored = _cli("criu", "restore", "-D", str(work / "dump"))
        assert restored.returncode == 0, restored.stderr
        assert [s.state_name for s in tcp_sockets(pid)] == ["FIN_WAIT2"]
        peer.sendall(b"after restore")
        peer.close()
        _wait_for(Path(f"{ready}.got"))
        assert Path(f"{ready}.got").read_text() == repr(b"after restore")
    finally:
        peer.close()
        listener.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the restored program has the same pid
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            program.wait(10)
