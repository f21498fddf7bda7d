"""A peer that connects while the program is frozen for a move: the kernel completes the handshake into the
listener's accept queue, where the program never takes it. migrate() keeps the listener open past the kill and
hands that connection off with the moved ones (sockrepair/move/backlog.py); before, the program's exit reset it."""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import subprocess
import sys

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


def test_the_port_is_free_as_soon_as_the_program_has_exited(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue is accepted right after the kill and the duplicates closed: a network step that binds the port
    once the program has exited finds it free, as it did before the backlog was kept."""
    with _echo() as (ns, port, server):
        moved = _connect(ns, port)
        late: list[socket.socket] = []
        real = take_module.checkpoint_all_taken

        def connect_then_checkpoint(*args: object, **kwargs: object) -> object:
            late.append(_connect_frozen(ns, port))
            return real(*args, **kwargs)  # type: ignore[arg-type]

        bound: list[socket.socket] = []

        def network() -> None:
            server.wait(10)
            with ns.entered():
                successor = socket.socket()
            bound.append(successor)
            successor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            successor.bind(("127.0.0.1", port))  # EADDRINUSE while a duplicate of the old listener lives
            successor.listen()

        monkeypatch.setattr(take_module, "checkpoint_all_taken", connect_then_checkpoint)
        report = sockrepair.migrate(server.pid, dest_netns=ns.name, network=network, handoff=_keep_sockets)
        try:
            [client] = late
            assert report.accepted == [str(ConnTuple(socket.AF_INET, "127.0.0.1", port, "127.0.0.1",
                                                     client.getsockname()[1]))]
            # the successor takes what connects from now on
            with ns.entered():
                newcomer = socket.create_connection(("127.0.0.1", port), timeout=10)
            late.append(newcomer)
            assert bound[0].accept()[1][1] == newcomer.getsockname()[1]
        finally:
            for s in list(report.handoff_result) + late + bound + [moved]:
                s.close()


_SUPERVISED = """
import socket, sys, threading
listener = socket.socket(fileno=int(sys.argv[1]))
def echo(c):
    while data := c.recv(4096):
        c.sendall(data)
while True:
    threading.Thread(target=echo, args=(listener.accept()[0],), daemon=True).start()
"""


def test_a_listener_sockrepair_itself_holds_too_is_left_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor (here the mover's own process) that made the listener and passed it to the program it moves:
    the listener is shared, so its queue is the supervisor's to accept, untouched and still blocking."""
    with NetNS() as ns:
        with ns.entered():
            listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with ns.entered():
            program = subprocess.Popen([sys.executable, "-c", _SUPERVISED, str(listener.fileno())],
                                       pass_fds=[listener.fileno()])
        sockets: list[socket.socket] = []
        try:
            moved = _connect(ns, port)
            sockets.append(moved)
            real = take_module.checkpoint_all_taken

            def connect_then_checkpoint(*args: object, **kwargs: object) -> object:
                sockets.append(_connect_frozen(ns, port))
                return real(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(take_module, "checkpoint_all_taken", connect_then_checkpoint)
            report = sockrepair.migrate(program.pid, dest_netns=ns.name, handoff=_keep_sockets)
            sockets += report.handoff_result
            assert report.accepted == [] and len(report.handoff_result) == 1
            assert not fcntl.fcntl(listener.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
            listener.settimeout(10)
            queued, _ = listener.accept()
            sockets.append(queued)
            assert recv_exactly(queued, 17) == b"sent while frozen"
        finally:
            for s in sockets + [listener]:
                s.close()
            program.kill()
            program.wait()


def test_the_backlog_leaves_the_restore_its_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted right after the kill, before the restore makes a socket per moved connection: with a tight fd
    limit the accepts keep those free (before, 70 moved connections and a queue of 30 under a limit 120 above the
    mover's fds ran out of fds in the restore, past the point of no return: EMFILE, every connection left to
    `restore -D`)."""
    with _echo() as (ns, port, server):
        moved = [_connect(ns, port) for _ in range(70)]
        late: list[socket.socket] = []
        real = take_module.checkpoint_all_taken

        def connect_then_checkpoint(*args: object, **kwargs: object) -> object:
            late.extend(_connect_frozen(ns, port) for _ in range(30))
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(take_module, "checkpoint_all_taken", connect_then_checkpoint)
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 120, limits[1]))
        try:
            report = sockrepair.migrate(server.pid, dest_netns=ns.name, handoff=_keep_sockets)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        restored = {s.getpeername()[1]: s for s in report.handoff_result}
        try:
            assert len(report.connections) == 70
            assert {c.getsockname()[1] for c in moved} <= set(restored)
            assert len(restored) == 70 + len(report.accepted)
            for client in moved + [c for c in late if c.getsockname()[1] in restored]:
                client.sendall(b"moved")
                assert recv_exactly(restored[client.getsockname()[1]], 5) == b"moved"
        finally:
            for s in list(restored.values()) + late + moved:
                s.close()
