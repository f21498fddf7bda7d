"""A peer that connects while the program is frozen for a move: the kernel completes the handshake into the
listener's accept queue, where the program never takes it. migrate() keeps the listener open past the kill and
hands that connection off with the moved ones (sockrepair/move/backlog.py); before, the program's exit reset it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import sockrepair
import sockrepair.move.take as take_module
from sockrepair.image.directory import NO_FD
from sockrepair.lab.hosts import SERVICE4, Lab
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.lab.subjects import start_receiver, stop
from sockrepair.move.handoff import send_over_unix
from sockrepair.move.journal import load_states
from sockrepair.move.pidfd import PidFd
from sockrepair.netns import NetNS
from sockrepair.state import TCP_CLOSE, TCP_ESTABLISHED, ConnTuple
from tests.clihelp import run_main
from tests.root.pairs import recv_exactly, tcp_info
from tests.root.programs import LISTENS, echo_connection, inline_program
from tests.root.test_take_changed import _connect, _echo, _keep_sockets


def _connect_frozen(ns: NetNS, port: int) -> socket.socket:
    """A connection the frozen program cannot accept, with a request already sent on it."""
    with ns.entered():
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"sent while frozen")
    return client


def _when_frozen(monkeypatch: pytest.MonkeyPatch, step: Callable[[], object]) -> None:
    """Run `step` under the freeze, right before the checkpoint (the connections locked)."""
    real = take_module.checkpoint_all_taken

    def step_then_checkpoint(*args: object, **kwargs: object) -> object:
        step()
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(take_module, "checkpoint_all_taken", step_then_checkpoint)


@pytest.mark.parametrize("wanted", ["every", "by-fd", "every-no-handoff"])
def test_a_connection_made_during_the_move_is_handed_off_not_reset(monkeypatch: pytest.MonkeyPatch,
                                                                    wanted: str) -> None:
    """Without a handoff, the accepted connection comes with the moved one in report.sockets."""
    with _echo() as (ns, port, server):
        moved = _connect(ns, port)
        late: list[socket.socket] = []
        # under the freeze: it waits in the accept queue
        _when_frozen(monkeypatch, lambda: late.append(_connect_frozen(ns, port)))
        fds = None
        if wanted == "by-fd":
            fds = [s.fd for s in take_module.tcp_sockets(server.pid) if s.tcp_state == TCP_ESTABLISHED]
        handoff = None if wanted == "every-no-handoff" else _keep_sockets
        report = sockrepair.migrate(server.pid, wanted=fds, dest_netns=ns.name, handoff=handoff)
        restored = {s.getpeername()[1]: s for s in (report.handoff_result if handoff else report.sockets)}
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


def test_a_move_that_fails_after_the_kill_resets_the_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    """A move that fails after the kill, before the handoff: what was accepted from the backlog ends as the
    listener's close ended it, with a RST, also for a peer that sent nothing (a plain close told it a FIN, an orderly
    end of a connection that never served it); the moved connection stays in the journal."""
    with _echo() as (ns, port, server):
        moved = _connect(ns, port)
        late: list[socket.socket] = []

        def connect() -> None:
            with ns.entered():
                late.append(socket.create_connection(("127.0.0.1", port), timeout=10))  # sends nothing

        def network() -> None:
            raise RuntimeError("the address could not be moved")

        _when_frozen(monkeypatch, connect)
        with pytest.raises(RuntimeError, match="could not be moved") as caught:
            sockrepair.migrate(server.pid, dest_netns=ns.name, network=network, handoff=_keep_sockets)
        journal = Path(caught.value.journal)  # type: ignore[attr-defined]
        try:
            [client] = late
            with pytest.raises(ConnectionResetError):
                client.recv(1)
            index = json.loads((journal / "journal.json").read_text())
            assert [c["tuple"] for c in index["connections"]] == [
                str(ConnTuple(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", moved.getsockname()[1]))]
            with _restored_echo(journal, ns):
                moved.sendall(b"moved")
                assert recv_exactly(moved, 5) == b"moved"
        finally:
            for s in [*late, moved]:
                s.close()
            shutil.rmtree(journal, ignore_errors=True)


def _receivers_copies(pid: int, peer: tuple[str, int]) -> list[socket.socket]:
    """Copies (pidfd_getfd) of the sockets process `pid` holds connected to `peer`."""
    found = []
    with PidFd(pid) as pidfd:
        for name in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:["):
                sock = socket.socket(fileno=pidfd.getfd(int(name)))
                if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
                    with contextlib.suppress(OSError):
                        if sock.getpeername() == peer:
                            found.append(sock)
                            continue
                sock.close()
    return found


def test_a_handoff_that_fails_after_passing_the_backlog_leaves_it_to_the_program(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A handoff that passed the sockets over SCM_RIGHTS and then failed: the accepted connection is the
    receiver's, and the failure path leaves its options alone (reset's SO_MARK and SO_LINGER 0 are the socket's:
    the receiver's orderly close would have sent a RST, and its packets passed any lock)."""
    with _echo() as (ns, port, server):
        moved = _connect(ns, port)
        late: list[socket.socket] = []

        def handoff(socks: list[socket.socket], tuples: list[ConnTuple]) -> None:
            send_over_unix(str(tmp_path / "r.sock"), socks, tuples)
            raise RuntimeError("the receiver did not acknowledge")

        _when_frozen(monkeypatch, lambda: late.append(_connect_frozen(ns, port)))
        receiver = start_receiver(tmp_path / "r.sock", max_seconds=60)
        journal = None
        try:
            with pytest.raises(RuntimeError, match="did not acknowledge") as caught:
                sockrepair.migrate(server.pid, dest_netns=ns.name, handoff=handoff)
            journal = Path(caught.value.journal)  # type: ignore[attr-defined]
            [client] = late
            assert recv_exactly(client, 17) == b"sent while frozen"  # echoed by the receiver
            [copy] = _receivers_copies(receiver.pid, client.getsockname())
            with copy:
                assert copy.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
                assert struct.unpack("ii", copy.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (0, 0)
            client.sendall(b"still served")
            assert recv_exactly(client, 12) == b"still served"
        finally:
            stop(receiver)
            for s in [*late, moved]:
                s.close()
            if journal is not None:
                with _restored_echo(journal, ns):  # the moved connection, journaled again: its lock released
                    pass
                shutil.rmtree(journal, ignore_errors=True)


def test_the_port_is_free_as_soon_as_the_program_has_exited(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue is accepted right after the kill and the duplicates closed: a network step that binds the port
    once the program has exited finds it free, as it did before the backlog was kept."""
    with _echo() as (ns, port, server):
        moved = _connect(ns, port)
        late: list[socket.socket] = []
        _when_frozen(monkeypatch, lambda: late.append(_connect_frozen(ns, port)))
        bound: list[socket.socket] = []

        def network() -> None:
            server.wait(10)
            with ns.entered():
                successor = socket.socket()
            bound.append(successor)
            successor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            successor.bind(("127.0.0.1", port))  # EADDRINUSE while a duplicate of the old listener lives
            successor.listen()

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


@contextlib.contextmanager
def _restored_echo(directory: Path, ns: NetNS) -> Iterator[None]:
    """`sockrepair restore -D directory --exec` the echo program inside `ns`, until the block ends; the block runs
    once it serves the connections."""
    with ns.entered():
        restored = subprocess.Popen([sys.executable, "-m", "sockrepair.cli.main", "restore", "-D", str(directory),
                                     "--exec", sys.executable, str(ECHO_SERVER)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
    try:
        assert restored.stdout is not None
        assert restored.stdout.readline().startswith(b"ready")
        yield
    finally:
        restored.kill()
        restored.wait()


def _frozen_connects(monkeypatch: pytest.MonkeyPatch, ns: NetNS, port: int, late: list[socket.socket],
                     urgent: bool = False) -> None:
    """Under the freeze, one connection to the service with a request sent (and then an urgent byte, `urgent`)."""
    real = take_module.checkpoint_all_taken

    def connect_then_checkpoint(*args: object, **kwargs: object) -> object:
        with ns.entered():
            client = socket.create_connection((SERVICE4, port), timeout=10)
        late.append(client)
        client.sendall(b"sent while frozen")
        if urgent:
            client.send(b"!", socket.MSG_OOB)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(take_module, "checkpoint_all_taken", connect_then_checkpoint)


def test_into_another_host_the_backlog_is_carried_with_the_moved_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Into another namespace the accepted sockets cannot go as they are: locked on both hosts, checkpointed,
    journaled, closed silently on A and restored on B with the moved ones (before, the program's exit reset them)."""
    with Lab() as lab, echo_connection(lab.a.ns, SERVICE4, peer=lab.peer.ns, port=7008) as (server, moved):
        late: list[socket.socket] = []
        _frozen_connects(monkeypatch, lab.peer.ns, 7008, late)
        report = sockrepair.migrate(server.pid, dest_netns=lab.b.name, network=lambda: lab.move_service("a", "b"),
                                    handoff=_keep_sockets)
        restored = {s.getpeername()[1]: s for s in report.handoff_result}
        try:
            [client] = late
            mine = ConnTuple(socket.AF_INET, SERVICE4, 7008, lab.peer.addr4, client.getsockname()[1])
            assert report.accepted == [str(mine)]
            assert report.connections == [str(ConnTuple(socket.AF_INET, SERVICE4, 7008, lab.peer.addr4,
                                                        moved.getsockname()[1]))]
            assert sorted(restored) == sorted([moved.getsockname()[1], client.getsockname()[1]])
            taken = restored[client.getsockname()[1]]  # on B: A's svc0 is down, and the peer's packets go to B
            assert recv_exactly(taken, 17) == b"sent while frozen"
            taken.sendall(b"answer")
            assert recv_exactly(client, 6) == b"answer"
            assert tcp_info(client)[2] == 0  # the request was acknowledged without the peer sending it again
            moved.sendall(b"moved")
            assert recv_exactly(restored[moved.getsockname()[1]], 5) == b"moved"
            assert not os.path.exists(report.journal)
            assert sockrepair.list_locks(lab.a.name) == sockrepair.list_locks(lab.b.name) == []
        finally:
            for s in list(restored.values()) + late:
                s.close()


def test_a_backlog_connection_that_cannot_be_carried_is_reset_and_the_move_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One whose checkpoint is refused (an urgent byte its peer sent before anyone accepted it) ends as the
    listener's close ended every one before: a RST, sent once it is unlocked, which a peer that only waits for its
    answer receives (closed while still locked, its RST was dropped and the peer waited forever); the moved
    connection arrives."""
    with Lab() as lab, echo_connection(lab.a.ns, SERVICE4, peer=lab.peer.ns, port=7009) as (server, moved):
        late: list[socket.socket] = []
        _frozen_connects(monkeypatch, lab.peer.ns, 7009, late, urgent=True)
        report = sockrepair.migrate(server.pid, dest_netns=lab.b.name, network=lambda: lab.move_service("a", "b"),
                                    handoff=_keep_sockets)
        try:
            [client] = late
            assert report.accepted == [] and len(report.handoff_result) == 1
            assert sockrepair.list_locks(lab.a.name) == sockrepair.list_locks(lab.b.name) == []
            client.settimeout(10)
            with pytest.raises(ConnectionResetError):
                client.recv(1)
            moved.sendall(b"moved")
            assert recv_exactly(report.handoff_result[0], 5) == b"moved"
        finally:
            for s in list(report.handoff_result) + late:
                s.close()


def test_a_backlog_connection_on_an_address_that_stays_is_reset_the_others_carried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener on 0.0.0.0: a peer that reached it through A's own address (which does not move) could not be
    restored on B, and restoring it with the others failed the whole move past its point of no return (and `restore
    -D` after it). It is reset at once; the one on the service address is carried."""
    with Lab() as lab, echo_connection(lab.a.ns, "0.0.0.0", SERVICE4, peer=lab.peer.ns, port=7011) as (server,
                                                                                                          moved):
        late: list[socket.socket] = []
        real = take_module.checkpoint_all_taken

        def connect_then_checkpoint(*args: object, **kwargs: object) -> object:
            for addr in (lab.a.addr4, SERVICE4):
                with lab.peer.entered():
                    client = socket.create_connection((addr, 7011), timeout=10)
                late.append(client)
                client.sendall(b"sent while frozen")
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(take_module, "checkpoint_all_taken", connect_then_checkpoint)
        report = sockrepair.migrate(server.pid, dest_netns=lab.b.name, network=lambda: lab.move_service("a", "b"),
                                    handoff=_keep_sockets)
        restored = {s.getpeername()[1]: s for s in report.handoff_result}
        try:
            stays, goes = late
            assert report.accepted == [str(ConnTuple(socket.AF_INET, SERVICE4, 7011, lab.peer.addr4,
                                                     goes.getsockname()[1]))]
            stays.settimeout(10)
            with pytest.raises(ConnectionResetError):
                stays.recv(1)
            assert recv_exactly(restored[goes.getsockname()[1]], 17) == b"sent while frozen"
            moved.sendall(b"moved")
            assert recv_exactly(restored[moved.getsockname()[1]], 5) == b"moved"
        finally:
            for s in list(restored.values()) + late:
                s.close()


def test_a_move_that_fails_after_carrying_the_backlog_leaves_it_in_the_journal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The carried connection is in the journal with the moved ones (fd NO_FD: the program never held it), so a
    restore of the journal, run on B once the address is there, brings both back."""
    with Lab() as lab, echo_connection(lab.a.ns, SERVICE4, peer=lab.peer.ns, port=7010) as (server, moved):
        late: list[socket.socket] = []
        _frozen_connects(monkeypatch, lab.peer.ns, 7010, late)

        def network() -> None:
            raise RuntimeError("the address could not be moved")

        with pytest.raises(RuntimeError, match="could not be moved") as caught:
            sockrepair.migrate(server.pid, dest_netns=lab.b.name, network=network, handoff=_keep_sockets)
        journal = Path(caught.value.journal)  # type: ignore[attr-defined]
        try:
            [client] = late
            index = json.loads((journal / "journal.json").read_text())
            ports = [client.getsockname()[1], moved.getsockname()[1]]
            assert [c["fd"] for c in index["connections"]][1:] == [NO_FD]
            assert sorted(int(c["tuple"].rsplit(":", 1)[1]) for c in index["connections"]) == sorted(ports)
            states = load_states(journal)
            assert bytes(states[1].recv_queue) == b"sent while frozen"
            lab.move_service("a", "b")
            with _restored_echo(journal, lab.b.ns):
                assert recv_exactly(client, 17) == b"sent while frozen"  # echoed by the program restored on B
                moved.sendall(b"moved")
                assert recv_exactly(moved, 5) == b"moved"
        finally:
            for s in late:
                s.close()
            shutil.rmtree(journal, ignore_errors=True)


def test_a_dump_that_kills_keeps_the_backlog_for_the_restore(netns: NetNS, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`sockrepair dump --kill`: a connection that waited in the program's accept queue is locked, checkpointed into
    the image directory after the others (fd -1, "accepted" in the listing) and restored by `restore -D` with them
    (before, the kill reset it)."""
    with echo_connection(netns) as (server, moved):
        port = moved.getpeername()[1]
        late: list[socket.socket] = []
        real = take_module.checkpoint_all_taken

        def connect_then_checkpoint(*args: object, **kwargs: object) -> object:
            late.append(_connect_frozen(netns, port))
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(take_module, "checkpoint_all_taken", connect_then_checkpoint)
        try:
            code, out, err = run_main("dump", "--pid", str(server.pid), "-D", str(tmp_path / "img"))
            assert code == 0, err
            [client] = late
            mine = ConnTuple(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", client.getsockname()[1])
            assert f"  accepted {str(mine):<48} unread 17 B" in out
            index = json.loads((tmp_path / "img" / "index.json").read_text())
            assert [(c["fd"] == NO_FD, c["tuple"]) for c in index["connections"]][1] == (True, str(mine))
            with _restored_echo(tmp_path / "img", netns):
                assert recv_exactly(client, 17) == b"sent while frozen"  # echoed by the restored program
                moved.sendall(b"moved")
                assert recv_exactly(moved, 5) == b"moved"
        finally:
            for s in late:
                s.close()


def _reset_and_reconnect_frozen(monkeypatch: pytest.MonkeyPatch, ns: NetNS, moved: socket.socket,
                                again: list[socket.socket]) -> None:
    """Under the freeze, before the lock: `moved` reset by its client (the program holds its end in CLOSE), and a
    connection to the same port from the same local address, a request sent on it, appended to `again`."""
    own, server = moved.getsockname(), moved.getpeername()
    real = take_module._taken_if_same

    def reset_and_reconnect(*args: object, **kwargs: object) -> object:
        moved.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        moved.close()
        with ns.entered():
            client = socket.socket()
        again.append(client)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind(own)
        client.settimeout(10)
        client.connect(server)
        client.sendall(b"sent while frozen")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(take_module, "_taken_if_same", reset_and_reconnect)


def test_a_backlog_connection_with_a_moved_connections_4_tuple_is_reset(netns: NetNS, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The peer of a moved connection resets it during the freeze (the program holds it in CLOSE) and connects again
    from the same port: two sockets of one 4-tuple. The new one, in the accept queue, was carried too, the index
    named the tuple twice, and `restore -D` refused the whole directory; it is reset now, as the kill reset it
    before, and the directory restores."""
    with echo_connection(netns) as (server, moved):
        port, own = moved.getpeername()[1], moved.getsockname()
        again: list[socket.socket] = []
        _reset_and_reconnect_frozen(monkeypatch, netns, moved, again)
        try:
            code, out, err = run_main("dump", "--pid", str(server.pid), "-D", str(tmp_path / "img"))
            assert code == 0, err
            [client] = again
            assert client.getsockname() == own
            tuples = [c["tuple"] for c in json.loads((tmp_path / "img" / "index.json").read_text())["connections"]]
            assert tuples == [str(ConnTuple(socket.AF_INET, "127.0.0.1", port, *own))]
            assert "accepted" not in out
            # carry() left it out: not the image directory's refusal, which resets all the accepted ones
            assert not [r.message for r in caplog.records if r.name == "sockrepair.move.backlog"]
            with pytest.raises(ConnectionResetError):
                client.recv(1)
            with _restored_echo(tmp_path / "img", netns):
                pass
        finally:
            for s in again:
                s.close()


def test_in_one_namespace_a_backlog_connection_on_a_moved_4_tuple_is_reset_before_the_restore(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same within one namespace, where the accepted socket is handed off as it is: it held the 4-tuple and
    the restore of the moved connection (in CLOSE) failed after the kill (EADDRINUSE), every connection of the
    program left locked. It is reset before the restore now, and the others move."""
    with _echo() as (ns, port, server):
        moved, bystander = _connect(ns, port), _connect(ns, port)
        again: list[socket.socket] = []
        _reset_and_reconnect_frozen(monkeypatch, ns, moved, again)
        report = sockrepair.migrate(server.pid, dest_netns=ns.name, handoff=_keep_sockets)
        restored = list(report.handoff_result)
        try:
            [client] = again
            assert report.accepted == []
            assert sorted(report.connections) == sorted(
                str(ConnTuple(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", c.getsockname()[1]))
                for c in (client, bystander))
            assert sorted(tcp_info(s)[0] for s in restored) == [TCP_ESTABLISHED, TCP_CLOSE]
            with pytest.raises(ConnectionResetError):
                client.recv(1)
            [theirs] = [s for s in restored if tcp_info(s)[0] == TCP_ESTABLISHED]
            bystander.sendall(b"still here")
            assert recv_exactly(theirs, 10) == b"still here"
            assert sockrepair.list_locks(ns.name) == []
        finally:
            for s in [*restored, *again, bystander]:
                s.close()


# accepts one connection and echoes on it; a second one waits in the accept queue for good
_ACCEPTS_ONE = LISTENS + """
conn = listener.accept()[0]
while data := conn.recv(4096):
    conn.sendall(data)
"""

# migrate() into namespace argv[2], SIGKILLed inside the carry of the backlog at argv[4] (a function of
# sockrepair.move.backlog): checkpoint_accepted, after their lock; _unguard, once they are journaled
_KILLED_IN_THE_CARRY = """
import os, signal, sys
import sockrepair
import sockrepair.move.backlog as backlog
setattr(backlog, sys.argv[4], lambda *args: os.kill(os.getpid(), signal.SIGKILL))
sockrepair.migrate(int(sys.argv[1]), dest_netns=sys.argv[2], journal=sys.argv[3], handoff=lambda socks, tuples: socks)
"""


@pytest.mark.parametrize("killed_at", ["checkpoint_accepted", "_unguard"])
def test_a_mover_killed_inside_the_carry_leaves_the_guard_to_reset_the_backlog(tmp_path: Path,
                                                                               killed_at: str) -> None:
    """SIGKILLed between the lock of the accepted connections and their journal: their sockets die with the mover,
    and what the kernel sent for them (a RST for the unread request) was dropped by their lock, so a peer waited
    for an answer nobody would give, told nothing even once the lock expired. The move's guard holds them until
    they are saved, and resets them past the lock (SOCCR_MARK); once the journal lists them, it does not (a
    restore of the journal brings them back: a peer both reset and answered could run its request twice)."""
    with NetNS() as source, NetNS() as dest, inline_program(source, _ACCEPTS_ONE) as program:
        clients: list[socket.socket] = []
        try:
            assert program.stdout is not None
            port = int(program.stdout.readline())
            moved = _connect(source, port)
            clients.append(moved)
            waiting = _connect_frozen(source, port)  # never accepted by the program
            clients.append(waiting)
            mover = subprocess.run([sys.executable, "-c", _KILLED_IN_THE_CARRY, str(program.pid), dest.name,
                                    str(tmp_path / "journal"), killed_at], capture_output=True, text=True,
                                   timeout=60)
            assert mover.returncode == -signal.SIGKILL, mover.stderr
            assert program.wait(10) == -signal.SIGKILL
            journaled = [c["tuple"] for c in json.loads((tmp_path / "journal" / "journal.json").read_text())[
                "connections"]]
            mine = str(ConnTuple(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", waiting.getsockname()[1]))
            if killed_at == "checkpoint_accepted":
                assert mine not in journaled
                with pytest.raises(ConnectionResetError):
                    waiting.recv(1)
            else:
                assert mine in journaled
                waiting.settimeout(1)  # the guard, done within milliseconds, sent nothing
                with pytest.raises(TimeoutError):
                    waiting.recv(1)
                assert tcp_info(waiting)[0] == TCP_ESTABLISHED
        finally:
            for s in clients:
                s.close()
