"""Helpers for the tests that talk to the lab's programs (started with sockrepair.lab.subjects)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sockrepair.lab.subjects import start_echo, stop
from sockrepair.netns import NetNS
from tests.root.pairs import recv_exactly


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


@contextmanager
def echo_connection(ns: NetNS, listen: str = "127.0.0.1", connect: str | None = None, *, peer: NetNS | None = None,
                    port: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """The echo program listening on `listen` in `ns` (on a free port unless `port`) and one connection to it from
    `peer` (default `ns`) to `connect` (default `listen`) that has echoed b"hello": an established, idle
    connection. Yields (the program, the client socket); closes the socket, then stops the program."""
    if port is None:
        with ns.entered():
            port = free_port()
    server = start_echo(f"[{listen}]:{port}" if ":" in listen else f"{listen}:{port}", netns=ns.name)
    try:
        with (peer or ns).entered():
            client = socket.create_connection((connect or listen, port))
        with client:
            client.sendall(b"hello")
            assert recv_exactly(client, 5) == b"hello"
            yield server, client
    finally:
        stop(server)


# the start of an inline_program() that listens: it prints its port, then the rest of the script accepts
LISTENS = """
import socket
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
"""


@contextmanager
def inline_program(ns: NetNS, script: str) -> Iterator[subprocess.Popen[str]]:
    """Python `script` run in `ns`, its stdout a text pipe (the script prints what the test reads: its port...);
    killed and reaped on the way out."""
    with ns.entered():
        program = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        yield program
    finally:
        program.kill()
        program.wait()
        if program.stdout is not None:
            program.stdout.close()
