"""criu restores a connection in CLOSE (its peer reset it while the program held it; 5 unread bytes) through
`sockrepair criu dump` / `criu restore`: the program then reads the bytes and b"", and neither the socket nor anyone sends anything on it
(the capture of loopback holds libsoccr's re-created FIN and ACK only).
criu's images keep no socket error, so the ECONNRESET the program had still to read is lost: `sockrepair criu
dump` refuses such a connection by pid, fd and tuple, before freezing anything, unless --allow-lost-errors."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

from sockrepair.lab.recorder import Recorder
from sockrepair.move.procfs import tcp_sockets
from tests.root.criu_programs import (
    cli,
    connected_program,
    wait_for_file,
    wait_for_states,
)

# Connects, says so, then once told to (the file PATH.go appears) reads what it holds and reports it.
PROGRAM = r"""
import errno, json, os, socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
open(sys.argv[2], "w").write("ready")
while not os.path.exists(sys.argv[2] + ".go"):
    time.sleep(0.02)
seen = [c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]]
for _ in range(3):
    try:
        seen.append(c.recv(100, socket.MSG_DONTWAIT).decode())
    except OSError as exc:
        seen.append(errno.errorcode[exc.errno])
try:
    c.send(b"x", socket.MSG_NOSIGNAL)
except OSError as exc:
    seen.append(errno.errorcode[exc.errno])
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(json.dumps(seen))
os.replace(sys.argv[2] + ".tmp", sys.argv[2] + ".got")
time.sleep(600)
"""


def test_criu_moves_a_reset_connection(criu, ns, work: Path) -> None:
    ready = work / "program.ready"
    with connected_program(ns, PROGRAM, ready) as (peer, program):
        pid = program.pid
        recorder: Recorder | None = None
        try:
            peer.sendall(b"hello")
            time.sleep(0.05)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
            wait_for_states(pid, ["CLOSE"])
            (closed,) = tcp_sockets(pid)
            assert closed.error_pending
            # criu's own checks reset connections of their own in the namespace (Tcp OutRsts moves): watch the wire
            recorder = Recorder("lo", ns.name).start()
            with ns.entered():
                refused = cli("criu", "dump", "--pid", str(pid), "-D", str(work / "refused"),
                              "--allow-external-peers")
                assert refused.returncode == 1 and refused.stdout == ""
                assert "sockrepair: error: criu's images keep no socket error" in refused.stderr
                assert f"pid {pid} fd {closed.fd} {closed.tuple}" in refused.stderr
                assert not (work / "refused").exists()
                assert program.poll() is None and tcp_sockets(pid) == [closed]
                dumped = cli("criu", "dump", "--pid", str(pid), "-D", str(work / "dump"), "--allow-external-peers",
                             "--allow-lost-errors")
            assert dumped.returncode == 0, dumped.stderr
            program.wait(10)  # criu ended it: reap it, or its pid stays taken
            with ns.entered():
                restored = cli("criu", "restore", "-D", str(work / "dump"))
                assert restored.returncode == 0, restored.stderr
                assert [s.state_name for s in tcp_sockets(pid)] == ["CLOSE"]
                Path(f"{ready}.go").write_text("go")
                wait_for_file(Path(f"{ready}.got"))
                # the original would have read "hello", ECONNRESET, "" and then failed to send with EPIPE
                assert json.loads(Path(f"{ready}.got").read_text()) == [7, "hello", "", "", "EPIPE"]
            recorder.stop()
            segments, recorder = recorder.segments(), None
            ours = [g for g in segments if closed.tuple.local_port in (g.src_port, g.dst_port)
                    and closed.tuple.remote_port in (g.src_port, g.dst_port)]
            # libsoccr's re-created FIN and ACK, from the peer's address; nothing from the socket, and no RST
            assert ours and not [g for g in ours if g.has("R") or g.src_port == closed.tuple.local_port], ours
        finally:
            if recorder is not None:
                recorder.stop()
