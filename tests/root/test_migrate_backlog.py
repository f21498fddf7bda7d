"""A peer that connects while the program is frozen for a move: the kernel completes the handshake into the
listener's accept queue, where the program never takes it. migrate() keeps the listener open past the kill and
hands that connection off with the moved ones (sockrepair/move/backlog.py); before, the program's exit reset it."""

from __future__ import annotations

import socket

import pytest

import sockrepair
import sockrepair.move.take as take_module
from sockrepair.netns import NetNS
from sockrepair.state import TCP_ESTABLISHED, ConnTuple
from tests.root.pairs import recv_exactly, tcp_info
from tests.root.test_take_changed import _connect, _echo, _keep_sockets


def _connect_frozen(ns: NetNS, port: int) -> socket.socket:
    """A connection the frozen program cannot accept, with a request already sent on it."""
    with ns.entered():
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"sent while frozen")
    return client


@pytest.mark.parametrize("wanted", ["every", "by-fd"])
def test_a_connection_made_during_the_move_is_handed_off_not_reset(monkeypatch: pytest.MonkeyPatch,
                                                                    wanted: str) -> None:
    with _echo() as (ns, port, server):
        moved = _connect(ns, port)
        late: list[socket.socket] = []
        real = take_module.checkpoint_all_taken

        def connect_then_checkpoint(*args: object, **kwargs: object) -> object:
            late.append(_connect_frozen(ns, port))  # under the freeze: it waits in the accept queue
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(take_module, "checkpoint_all_taken", connect_then_checkpoint)
        fds = None
        if wanted == "by-fd":
            fds = [s.fd for s in take_module.tcp_sockets(server.pid) if s.tcp_state == TCP_ESTABLISHED]
        report = sockrepair.migrate(server.pid, wanted=fds, dest_netns=ns.name, handoff=_keep_sockets)
        restored = {s.getpeername()[1]: s for s in report.handoff_result}
        try:
            [client] = late
            mine = ConnTuple(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", client.getsockname()[1])
            if wanted == "by-fd":
                # only the fds asked for move: the accept queue dies with the program, as it always did
                assert sorted(restored) == [moved.getsockname()[1]] and report.accepted == []
                with pytest.raises(ConnectionResetError):
                    client.sendall(b"x")
                    client.recv(1)
                return
            assert sorted(restored) == sorted([moved.getsockname()[1], client.getsockname()[1]])
            assert report.accepted == [str(mine)] and report.to_dict()["accepted"] == [str(mine)]
            taken = restored[client.getsockname()[1]]
            # what the peer sent before anyone accepted it is there, and the connection works both ways
            assert recv_exactly(taken, 17) == b"sent while frozen"
            taken.sendall(b"answer")
            assert recv_exactly(client, 6) == b"answer"
            assert tcp_info(client)[2] == 0
            moved.sendall(b"moved")
            assert recv_exactly(restored[moved.getsockname()[1]], 5) == b"moved"
        finally:
            for s in list(restored.values()) + late + [moved]:
                s.close()
