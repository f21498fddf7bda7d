"""criu restores a half-closed connection under sockrepair's lock: libsoccr re-creates the peer's ACK of our FIN as
a packet marked SOCCR_MARK, which the lock lets through (docs/criu-errors.md `fin-packet` when something drops it).
`sockrepair criu dump` locks the connection although it is not ESTABLISHED."""

from __future__ import annotations

from pathlib import Path

from sockrepair.move.procfs import tcp_sockets
from tests.root.criu_programs import (
    cli,
    connected_program,
    wait_for_file,
    wait_for_states,
)

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


def test_criu_moves_a_fin_wait2_connection(criu, ns, work: Path) -> None:
    ready = work / "program.ready"
    with connected_program(ns, PROGRAM, ready) as (peer, program):
        pid = program.pid
        wait_for_states(pid, ["FIN_WAIT2"])
        with ns.entered():
            dumped = cli("criu", "dump", "--pid", str(pid), "-D", str(work / "dump"), "--allow-external-peers")
        assert dumped.returncode == 0, dumped.stderr
        assert "1 connection(s) locked" in dumped.stdout
        program.wait(10)  # criu ended it: reap it, or its pid stays taken
        with ns.entered():
            restored = cli("criu", "restore", "-D", str(work / "dump"))
        assert restored.returncode == 0, restored.stderr
        assert [s.state_name for s in tcp_sockets(pid)] == ["FIN_WAIT2"]
        peer.sendall(b"after restore")
        peer.close()
        wait_for_file(Path(f"{ready}.got"))
        assert Path(f"{ready}.got").read_text() == repr(b"after restore")
