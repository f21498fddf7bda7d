"""`sockrepair restore --exec` runs the program in the namespace its connections live in, whichever namespace the
restore is run from."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.lab.subjects import start_echo, stop
from sockrepair.move.procfs import tcp_sockets
from sockrepair.netns import NetNS
from tests.root.programs import free_port
from tests.root.streams import connect_clients, echo_round

CLI = [sys.executable, "-m", "sockrepair.cli.main"]


@contextlib.contextmanager
def _dumped(ns: NetNS, images: Path) -> Iterator[tuple[list[socket.socket], list[int], list[subprocess.Popen[bytes]]]]:
    """The echo program in `ns` with 2 connections from this namespace, echoed once, then `sockrepair dump`ed into
    `images`. Yields (the clients, their echo offsets, a list the test appends the restore's processes to); every
    one of those is killed, the clients closed and the program stopped afterwards."""
    with ns.entered():
        port = free_port()
    server = start_echo(f"127.0.0.1:{port}", netns=ns.name)
    with ns.entered():
        clients = connect_clients(port, 2)
    restores: list[subprocess.Popen[bytes]] = []
    try:
        offsets = [0, 0]
        echo_round(clients, offsets, 3000)
        done = subprocess.run([*CLI, "dump", "--pid", str(server.pid), "-D", str(images), "--json"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["connections"]) == 2
        yield clients, offsets, restores
    finally:
        for c in clients:
            c.close()
        stop(server)
        for restored in restores:
            restored.kill()
            restored.wait()


def _restore_into_echo(images: Path, restores: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """`sockrepair restore -D images --exec` the echo program, run from this (the root) namespace: the images say
    where the connections are. Returns once the program serves them."""
    restored = subprocess.Popen([*CLI, "restore", "-D", str(images), "--exec", sys.executable, str(ECHO_SERVER)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    restores.append(restored)
    assert restored.stdout is not None
    line = restored.stdout.readline()
    assert line.startswith(b"ready"), line
    return restored


def test_the_exec_program_runs_in_the_connections_namespace(ns: NetNS, tmp_path: Path) -> None:
    with _dumped(ns, tmp_path / "img") as (clients, offsets, restores):
        restored = _restore_into_echo(tmp_path / "img", restores)
        assert os.stat(f"/proc/{restored.pid}/ns/net").st_ino == os.stat(ns.path).st_ino
        # so /proc/PID/net lists them, as a later dump of the program needs
        assert len(tcp_sockets(restored.pid)) == 2
        echo_round(clients, offsets, 20_000)


def test_a_program_that_ends_at_once_either_had_the_connections_or_gets_them_put_back(
        ns: NetNS, tmp_path: Path) -> None:
    """`--exec true`: the exit status is true's (the restorer became it). The guard finds the program holding the
    connections (handed off: its exit closes them, the clients read its FIN) or already gone (put back, locked,
    and its line says so: a second restore hands them to a program that keeps them). Which one is a race between
    the guard's look and the program's exit; neither loses a connection without a word."""
    with _dumped(ns, tmp_path / "img") as (clients, offsets, restores):
        first = subprocess.run([*CLI, "restore", "-D", str(tmp_path / "img"), "--exec", "true"],
                               capture_output=True, text=True, timeout=120)
        assert first.returncode == 0  # true's
        if (tmp_path / "img" / "completed").exists():
            assert "put back" not in first.stderr, first.stderr
            for c in clients:
                c.settimeout(10)
                assert c.recv(1) == b""  # the program's exit closed them: a FIN, not a reset
            return
        assert "the handoff of 2 connection(s) did not complete" in first.stderr, first.stderr
        assert "put back, still locked" in first.stderr
        _restore_into_echo(tmp_path / "img", restores)
        echo_round(clients, offsets, 20_000)
