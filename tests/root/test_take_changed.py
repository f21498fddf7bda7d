"""A program that changes its sockets between the look and the freeze (sockrepair/move/take.py captured): a chosen
fd closed, its number taken by a new connection, or a new connection at a new number. Under the freeze the copies'
inodes and the other sockets' fds are compared with the look's, and the process's sockets are read again when one
differs: the move takes what the program holds at the freeze."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

import sockrepair
import sockrepair.move.dump as dump_module
import sockrepair.move.take as take_module
from sockrepair.errors import SocketStateError
from sockrepair.lab.subjects import start_echo, stop
from sockrepair.move.procfs import socket_inodes, tcp_sockets
from sockrepair.netns import NetNS
from sockrepair.state import TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN, ConnTuple
from tests.root.pairs import recv_exactly, tcp_info, wait_for
from tests.root.programs import LISTENS, free_port, inline_program


def _keep_sockets(socks: list[socket.socket], _tuples: object) -> list[socket.socket]:
    return socks


def _connect(ns: NetNS, port: int) -> socket.socket:
    with ns.entered():
        client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"hello")
    assert recv_exactly(client, 5) == b"hello"  # accepted and served
    return client


def _move_all(pid: int, ns: NetNS, clients: list[socket.socket]) -> None:
    """migrate() the program's connections within `ns`: exactly those of `clients` arrive, each working; all closed
    afterwards."""
    report = sockrepair.migrate(pid, dest_netns=ns.name, handoff=_keep_sockets)
    restored = {s.getpeername()[1]: s for s in report.handoff_result}
    try:
        assert sorted(restored) == sorted(c.getsockname()[1] for c in clients)
        for client in clients:
            client.sendall(b"moved")
            assert recv_exactly(restored[client.getsockname()[1]], 5) == b"moved"
    finally:
        for s in list(restored.values()) + clients:
            s.close()


@contextlib.contextmanager
def _echo() -> Iterator[tuple[NetNS, int, subprocess.Popen[bytes]]]:
    """An echo program in a namespace of its own: (the namespace, its port, the program), reaped on the way out
    (the move ends it)."""
    with NetNS() as ns:
        with ns.entered():
            port = free_port()
        server = start_echo(f"127.0.0.1:{port}", netns=ns.name)
        try:
            yield ns, port, server
        finally:
            stop(server)


@pytest.mark.parametrize("change", ["fd-closed", "fd-number-reused", "new-connection"])
def test_the_move_takes_what_the_program_holds_at_the_freeze(monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    with _echo() as (ns, port, server):
        clients: list[socket.socket] = []
        kept, gone = _connect(ns, port), _connect(ns, port)
        clients += [kept, gone]
        [gone_fd] = [s.fd for s in tcp_sockets(server.pid)
                     if s.tcp_state == TCP_ESTABLISHED and s.tuple.remote_port == gone.getsockname()[1]]
        gone_inode = socket_inodes(server.pid)[gone_fd]
        real_freeze = take_module.quiescent_freeze

        def freeze_after_a_change(pid: int, *args: object, **kwargs: object) -> object:
            if change == "new-connection":  # accepted at a fd number the look did not see
                clients.append(_connect(ns, port))
                return real_freeze(pid, *args, **kwargs)  # type: ignore[arg-type]
            gone.close()  # the program closes its end at the EOF
            wait_for(lambda: gone_fd not in socket_inodes(pid), "the program to close its socket", 5.0)
            if change == "fd-number-reused":  # the lowest free fd number: the one just closed
                clients.append(_connect(ns, port))
                now = socket_inodes(pid).get(gone_fd)
                assert now is not None and now != gone_inode, "the new connection did not take the fd number"
            return real_freeze(pid, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(take_module, "quiescent_freeze", freeze_after_a_change)
        report = sockrepair.migrate(server.pid, dest_netns=ns.name, handoff=_keep_sockets)
        live = clients if change == "new-connection" else [kept] + clients[2:]
        restored = {s.getpeername()[1]: s for s in report.handoff_result}
        try:
            assert sorted(restored) == sorted(c.getsockname()[1] for c in live)
            # the tuples locked and reported are the ones taken: the program's sockets at the freeze
            assert sorted(report.connections) == sorted(
                str(ConnTuple(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", c.getsockname()[1])) for c in live)
            for client in live:
                client.sendall(b"moved")
                peer = restored[client.getsockname()[1]]
                assert recv_exactly(peer, 5) == b"moved"
                peer.sendall(b"ok")
                assert recv_exactly(client, 2) == b"ok"
                assert tcp_info(client)[2] == 0
        finally:
            for s in list(restored.values()) + clients:
                s.close()


@pytest.mark.parametrize("after", ["select_sockets", "left_behind", "refuse_shared"])
def test_a_connection_accepted_during_the_look_is_moved(monkeypatch: pytest.MonkeyPatch, after: str) -> None:
    """Accepted once the look has read the fds it chooses from (after choosing, after counting the losses, after
    checking for shared sockets): neither chosen nor lost, it is new under the freeze, and taken there. (Before the
    fds not chosen were compared as listed once the choice was made, one accepted in between was in neither list
    and died with the program.)"""
    with _echo() as (ns, port, server):
        clients: list[socket.socket] = []
        clients.append(_connect(ns, port))
        real = getattr(take_module, after)

        def then_accept(*args: object, **kwargs: object) -> object:
            result = real(*args, **kwargs)
            if len(clients) == 1:
                clients.append(_connect(ns, port))
            return result

        monkeypatch.setattr(take_module, after, then_accept)
        _move_all(server.pid, ns, clients)
        assert len(clients) == 2


def _closed_by_the_program(pid: int, gone: socket.socket, gone_fd: int, reused: bool, ns: NetNS, port: int,
                           clients: list[socket.socket]) -> None:
    """`gone` closed, so that the program closes its end (fd `gone_fd`) at the EOF; with `reused`, a new connection
    (added to `clients`) takes that fd number."""
    gone.close()
    wait_for(lambda: gone_fd not in socket_inodes(pid), "the program to close its socket", 5.0)
    if reused:
        clients.append(_connect(ns, port))
        assert gone_fd in socket_inodes(pid), "the new connection did not take the fd number"


@pytest.mark.parametrize("change", ["fd-closed", "fd-number-reused"])
def test_a_connection_closed_during_the_look_is_neither_taken_nor_lost(monkeypatch: pytest.MonkeyPatch,
                                                                       change: str) -> None:
    """Closed by the program once chosen, before the chosen sockets are screened (and its number perhaps given to
    a new connection at once): the move takes the others, and the new one under the freeze. (Before, the screen's
    pidfd_getfd failed and the whole move was refused: "process N has no fd M".)"""
    with _echo() as (ns, port, server):
        kept, gone = _connect(ns, port), _connect(ns, port)
        clients = [kept]
        [gone_fd] = [s.fd for s in tcp_sockets(server.pid)
                     if s.tcp_state == TCP_ESTABLISHED and s.tuple.remote_port == gone.getsockname()[1]]
        real = take_module.select_sockets
        calls = []

        def then_close(pid: int, *args: object, **kwargs: object) -> object:
            chosen = real(pid, *args, **kwargs)  # type: ignore[arg-type]
            calls.append(chosen)
            if len(calls) == 1:
                assert gone_fd in [s.fd for s in chosen]
                _closed_by_the_program(pid, gone, gone_fd, change == "fd-number-reused", ns, port, clients)
            return chosen

        monkeypatch.setattr(take_module, "select_sockets", then_close)
        _move_all(server.pid, ns, clients)


_TWIN = """
import os, socket, threading
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
conns = [listener.accept()[0] for _ in range(2)]
print(conns[0].fileno(), conns[1].fileno(), os.dup(conns[0].fileno()), flush=True)
def echo(c):
    while data := c.recv(4096):
        c.sendall(data)
for c in conns:
    threading.Thread(target=echo, args=(c,), daemon=True).start()
threading.Event().wait()
"""


@pytest.mark.parametrize("wanted", ["every", "one-of-the-twins"])
def test_a_connection_at_two_fds_is_refused_or_moved_once(wanted: str) -> None:
    """A program holding one connection at two fds (dup): taking both would restore its 4-tuple twice, the second
    failing once the program is gone. Every connection asked for: refused before anything is frozen, the program
    going on; the twin left out: the connection is moved once, and the twin is no loss."""
    with NetNS() as ns:
        with ns.entered():
            program = subprocess.Popen([sys.executable, "-c", _TWIN], stdout=subprocess.PIPE, text=True)
        clients: list[socket.socket] = []
        restored: list[socket.socket] = []
        try:
            assert program.stdout is not None
            port = int(program.stdout.readline())
            with ns.entered():
                clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            first, second, twin = map(int, program.stdout.readline().split())
            if wanted == "every":
                twice = rf"fds {first} and {twin} of process {program.pid} \(\S+\) hold the same connection"
                with pytest.raises(SocketStateError, match=twice) as refused:
                    sockrepair.migrate(program.pid, dest_netns=ns.name, handoff=_keep_sockets)
                assert (refused.value.pid, refused.value.fd) == (program.pid, twin)
                peers = clients
            else:
                report = sockrepair.migrate(program.pid, wanted=[first, second], dest_netns=ns.name,
                                            handoff=_keep_sockets)
                restored = list(report.handoff_result)
                by_port = {s.getpeername()[1]: s for s in restored}
                assert sorted(by_port) == sorted(c.getsockname()[1] for c in clients)
                peers = [by_port[c.getsockname()[1]] for c in clients]
            for client, peer in zip(clients, peers):
                client.sendall(b"still here")
                if peer is client:  # refused: the program itself echoes
                    assert recv_exactly(client, 10) == b"still here"
                else:
                    assert recv_exactly(peer, 10) == b"still here"
            assert (program.poll() is None) == (wanted == "every")
        finally:
            for s in clients + restored:
                s.close()
            program.kill()
            program.wait()
            if program.stdout is not None:
                program.stdout.close()


# accepts two connections and holds them; echoes on the second: the first, reset by its peer, stays in CLOSE
_HOLDS_A_RESET_ONE = LISTENS + """
first = listener.accept()[0]
print(first.fileno(), flush=True)
second = listener.accept()[0]
print(second.fileno(), flush=True)
while data := second.recv(4096):
    second.sendall(data)
"""


def test_two_sockets_of_one_4_tuple_are_refused_before_the_lock() -> None:
    """The program holds a connection its peer reset (CLOSE, the reset unread) and the one that peer made again
    from the same port: two sockets of one 4-tuple, which cannot both be restored. migrate() found out after the
    kill and lost every connection (a journal that no restore could complete); it is refused under the freeze,
    before the lock, and the program goes on."""
    with NetNS() as ns, inline_program(ns, _HOLDS_A_RESET_ONE) as program:
        clients: list[socket.socket] = []
        try:
            assert program.stdout is not None
            port = int(program.stdout.readline())
            with ns.entered():
                clients.append(socket.create_connection(("127.0.0.1", port)))
            closed = int(program.stdout.readline())
            own = clients[0].getsockname()
            clients[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            clients[0].close()
            with ns.entered():
                again = socket.socket()
            clients.append(again)
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(own)
            again.connect(("127.0.0.1", port))
            live = int(program.stdout.readline())
            wait_for(lambda: [s.tcp_state for s in tcp_sockets(program.pid)] == [TCP_LISTEN, TCP_CLOSE,
                                                                                 TCP_ESTABLISHED], "the reset")
            refused = rf"process {program.pid} \(\S+\) holds fd {closed} \(CLOSE\) and fd {live} \(ESTABLISHED\)"
            with pytest.raises(SocketStateError, match=refused) as caught:
                sockrepair.migrate(program.pid, dest_netns=ns.name, handoff=_keep_sockets)
            assert (caught.value.pid, caught.value.fd) == (program.pid, live)
            assert sockrepair.list_locks(ns.name) == []
            again.sendall(b"still here")
            assert recv_exactly(again, 10) == b"still here"  # the program goes on, out of repair mode
        finally:
            for s in clients:
                s.close()


@pytest.mark.parametrize("change", ["fd-closed", "fd-number-reused"])
def test_inspect_leaves_out_a_connection_closed_while_it_looks(monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """inspect's twin of the screen's case: a listed fd closed before inspect takes its copy, or its number given to
    a new connection, is left out; the new connection is not read under the closed one's listing."""
    with _echo() as (ns, port, server):
        kept, gone = _connect(ns, port), _connect(ns, port)
        clients = [kept, gone]
        established = {s.tuple.remote_port: s.fd for s in tcp_sockets(server.pid) if s.tcp_state == TCP_ESTABLISHED}
        kept_fd, gone_fd = established[kept.getsockname()[1]], established[gone.getsockname()[1]]
        real = dump_module.tcp_sockets

        def then_close(pid: int, *args: object, **kwargs: object) -> object:
            listed = real(pid, *args, **kwargs)  # type: ignore[arg-type]
            _closed_by_the_program(pid, gone, gone_fd, change == "fd-number-reused", ns, port, clients)
            return listed

        monkeypatch.setattr(dump_module, "tcp_sockets", then_close)
        try:
            rows = dump_module.inspect(server.pid)
            read = {s.fd: state for s, state, _ in rows if state is not None}
            assert list(read) == [kept_fd]
            assert read[kept_fd].tuple.remote_port == kept.getsockname()[1]
            assert gone_fd not in [s.fd for s, _, _ in rows]
            # inspect changed nothing: every connection still echoes
            for client in clients[:1] + clients[2:]:
                client.sendall(b"still")
                assert recv_exactly(client, 5) == b"still"
        finally:
            for s in clients:
                s.close()
