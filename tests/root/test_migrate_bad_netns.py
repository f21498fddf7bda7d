"""migrate() with a destination namespace name that names nothing (empty, a path, a missing name) refuses before it
touches the program: the program keeps running and serving, and no lock is left."""

from __future__ import annotations

import socket

import pytest

import sockrepair
from sockrepair.errors import NetnsError
from sockrepair.lab.subjects import start_echo, stop
from sockrepair.netns import NetNS
from sockrepair.state import ConnTuple
from tests.root.pairs import recv_exactly
from tests.root.programs import free_port


@pytest.mark.parametrize("dest", ["", "a/b", "sockrepair-no-such-namespace"])
def test_a_bad_destination_namespace_leaves_the_program_running(dest: str) -> None:
    with NetNS() as ns:
        with ns.entered():
            port = free_port()
        server = start_echo(f"127.0.0.1:{port}", netns=ns.name)
        try:
            with ns.entered():
                client = socket.create_connection(("127.0.0.1", port))
            with client:
                client.sendall(b"before")
                assert recv_exactly(client, 6) == b"before"
                # called from the program's namespace, where an empty name would have meant "here"
                with ns.entered(), pytest.raises(NetnsError):
                    sockrepair.migrate(server.pid, dest_netns=dest)
                assert server.poll() is None  # not ended
                client.sendall(b"after")
                assert recv_exactly(client, 5) == b"after"
                with ns.entered():
                    tuple_ = ConnTuple(socket.AF_INET, *client.getsockname()[:2], *client.getpeername()[:2])
                    assert not any(r.tuple == tuple_ or r.tuple == tuple_.reversed() for r in sockrepair.list_locks())
        finally:
            stop(server)
