"""`sockrepair restore --exec` runs the program in the namespace its connections live in, whichever namespace the
restore is run from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.lab.subjects import start_echo, stop
from sockrepair.move.procfs import tcp_sockets
from sockrepair.netns import NetNS
from tests.root.programs import free_port
from tests.root.streams import connect_clients, echo_round

CLI = [sys.executable, "-m", "sockrepair.cli.main"]


def test_the_exec_program_runs_in_the_connections_namespace(ns: NetNS, tmp_path: Path) -> None:
    with ns.entered():
        port = free_port()
    server = start_echo(f"127.0.0.1:{port}", netns=ns.name)
    restored = None
    with ns.entered():
        clients = connect_clients(port, 2)
    try:
        offsets = [0, 0]
        echo_round(clients, offsets, 3000)
        done = subprocess.run([*CLI, "dump", "--pid", str(server.pid), "-D", str(tmp_path / "img"), "--json"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["connections"]) == 2
        # run from this (the root) namespace: the images say where the connections are
        restored = subprocess.Popen([*CLI, "restore", "-D", str(tmp_path / "img"), "--exec", sys.executable,
                                     str(ECHO_SERVER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert restored.stdout is not None
        line = restored.stdout.readline()
        assert line.startswith(b"ready"), line
        assert os.stat(f"/proc/{restored.pid}/ns/net").st_ino == os.stat(ns.path).st_ino
        # so /proc/PID/net lists them, as a later dump of the program needs
        assert len(tcp_sockets(restored.pid)) == 2
        echo_round(clients, offsets, 20_000)
    finally:
        for c in clients:
            c.close()
        stop(server)
        if restored is not None:
            restored.kill()
            restored.wait()
