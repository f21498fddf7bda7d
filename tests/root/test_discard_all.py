"""discard_all (engine/_batch.py), as end_source uses it: our copies of a frozen program's sockets are disconnected
in repair mode and closed, so a connection's 4-tuple is free for its restore in the same namespace at once, while
the program (killed, still exiting) holds its own reference to the old socket; the peer sees nothing of it."""

from __future__ import annotations

import os
import socket

import pytest

import sockrepair
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.engine._batch import checkpoint_many, discard_all
from tests.root.pairs import FAMILIES, recv_exactly

TCP = socket.IPPROTO_TCP
ESTABLISHED = 1


def _pair(family: int, listen_addr: str, connect_addr: str) -> tuple[socket.socket, socket.socket]:
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((listen_addr, 0))
        listener.listen(1)
        client = socket.create_connection((connect_addr, listener.getsockname()[1]))
        server, _ = listener.accept()
    return client, server


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_the_tuple_is_free_while_the_program_still_holds_the_old_socket(
        netns, family: int, listen_addr: str, connect_addr: str) -> None:
    """Fails with the close alone (the old socket stays in the established hash until the last reference goes:
    the restore's connect is refused, EADDRNOTAVAIL)."""
    client, server = _pair(family, listen_addr, connect_addr)
    restored = None
    held = -1
    try:
        client.sendall(b"before the move")
        assert recv_exactly(server, 15) == b"before the move"
        # the copy end_source discards (pidfd_getfd's, here a dup); the program keeps `server`
        copy = os.dup(server.fileno())
        [state] = checkpoint_many([copy])
        held = copy
        assert discard_all([copy], [os.fstat(copy).st_ino]) is True
        held = -1
        # the program's reference is still open and in repair mode: the connection is restored beside it
        restored = sockrepair.restore(state)
        # nothing reached the peer: no FIN (it would read EOF), no RST (it would be in CLOSE)
        assert tcpinfo.read(client, "tcpi_state")[0] == ESTABLISHED
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(1)
        client.setblocking(True)
        restored.sendall(b"from the restored socket")
        assert recv_exactly(client, 24) == b"from the restored socket"
        client.sendall(b"to the restored socket")
        assert recv_exactly(restored, 22) == b"to the restored socket"
    finally:
        if held >= 0:
            os.close(held)
        if restored is not None:
            restored.close()
        server.close()  # in repair mode: silent
        client.close()
