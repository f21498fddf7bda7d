"""A program's own sockets, which sockrepair reaches through pidfd_getfd copies (one open file description), stay
as the program made them whatever socket.setdefaulttimeout() sockrepair's caller set: marked and unmarked by
sockrepair.move.land.passing_lock (a dump that leaves its process running), taken out of repair mode by the guard
of a move whose sockrepair died (sockrepair.move.freeze._recover), held by a guard (sockrepair.move.pidfd
shared_socket)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from sockrepair.lock.ruleset import SOCCR_MARK
from sockrepair.move.land import passing_lock
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState, ConnTuple, SocketOptions, TcpOptions


@pytest.fixture
def default_timeout() -> Iterator[None]:
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def test_marking_an_fd_leaves_the_programs_socket_blocking(netns: NetNS, default_timeout: None) -> None:
    # made before the default timeout would apply to it: a program's blocking socket
    program = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    program.settimeout(None)
    program.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 7)
    copy = os.dup(program.fileno())  # as pidfd_getfd takes it: the same open file description
    state = ConnectionState(ConnTuple(socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2), 1, 0, 0, b"", 0, b"",
                            TcpOptions(1460, False, False, False, 0, 0), None, 0, SocketOptions(mark=7))
    try:
        with passing_lock([copy], [state]):
            assert program.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == SOCCR_MARK
        assert program.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 7
        # socket.socket(fileno=fd) under a default timeout set O_NONBLOCK on it: the resumed program's blocking
        # recv() then failed with EAGAIN (test fails without the fix)
        assert os.get_blocking(program.fileno())
    finally:
        os.close(copy)
        program.close()


def test_the_guard_resuming_a_program_leaves_its_socket_blocking(netns: NetNS, default_timeout: None) -> None:
    """The guard of a move whose sockrepair died before the point of no return takes the program's sockets out of
    repair mode and sets SO_REUSEADDR again (sockrepair.move.freeze._recover); the default timeout sockrepair's
    caller set (inherited over the fork) must not make the program's socket non-blocking (test fails without it)."""
    from sockrepair.engine import checkpoint
    from sockrepair.engine._repair import in_repair
    from sockrepair.move.freeze import _recover

    listener = socket.create_server(("127.0.0.1", 0))
    program = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    program.settimeout(None)
    program.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    pidfd = os.pidfd_open(os.getpid())
    try:
        checkpoint(program)
        assert in_repair(program.fileno())
        watched = {"ended": False, "fds": [program.fileno()], "tuples": [], "reuse": {program.fileno()}}
        _recover(os.getpid(), pidfd, None, watched)  # type: ignore[arg-type]
        assert not in_repair(program.fileno())
        assert program.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert os.get_blocking(program.fileno())
        program.sendall(b"still here")
        assert peer.recv(64) == b"still here"
    finally:
        os.close(pidfd)
        for s in (program, peer, listener):
            s.close()


def _connected() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    program = socket.create_connection(listener.getsockname())
    program.settimeout(None)  # a program's blocking socket
    peer, _ = listener.accept()
    return listener, program, peer


def test_the_guard_holding_a_handed_socket_leaves_it_blocking(netns: NetNS, default_timeout: None) -> None:
    """A move's guard holds a duplicate of each restored socket until the handoff is over (sockrepair.move.freeze
    _Landing.take_holds), while the program it was handed to uses it: the guard's copy must not make that program's
    socket non-blocking under the default timeout the guard inherited over its fork (test fails without
    sockrepair.move.pidfd.shared_socket)."""
    from sockrepair.move.freeze import _HOLD, _Landing

    listener, program, peer = _connected()
    ours, guards = socket.socketpair()
    try:
        socket.send_fds(ours, [_HOLD], [program.fileno()])
        landing = _Landing(guards)
        landing.take_holds()
        assert [s.getpeername() for s in landing.socks] == [program.getpeername()]
        assert landing.socks[0].family == socket.AF_INET
        assert os.get_blocking(program.fileno())
        for s in landing.socks:
            s.close()
        program.sendall(b"still blocking")
        assert peer.recv(64) == b"still blocking"
    finally:
        for s in (ours, guards, program, peer, listener):
            s.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_shared_socket_object_keeps_the_files_flags_and_its_family(netns: NetNS, default_timeout: None,
                                                                    family: int) -> None:
    """What the guards and the listen backlog make of another process's socket (sockrepair.move.pidfd.shared_socket)."""
    from sockrepair.move.pidfd import shared_socket

    listener = socket.create_server(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0), family=family)
    listener.settimeout(None)
    copy = os.dup(listener.fileno())
    try:
        shared = shared_socket(copy)
        assert (shared.family, shared.type, shared.getsockname()) == (family, socket.SOCK_STREAM,
                                                                     listener.getsockname())
        assert os.get_blocking(listener.fileno())
        shared.close()
    finally:
        listener.close()


def test_a_moved_connection_reaches_its_new_program_blocking(default_timeout: None) -> None:
    """The restored sockets a move hands to a program are blocking, as a new socket of that program would be,
    whatever default timeout sockrepair's caller set (before: O_NONBLOCK on the handed file, and a blocking read()
    in the new program failed with EAGAIN)."""
    import sockrepair
    from sockrepair.lab.subjects import start_echo, stop
    from tests.root.programs import free_port

    with NetNS() as ns:
        with ns.entered():
            port = free_port()
        server = start_echo(f"127.0.0.1:{port}", netns=ns.name)
        peer = None
        handed: list[socket.socket] = []
        try:
            with ns.entered():
                peer = socket.create_connection(("127.0.0.1", port))
                peer.sendall(b"hi")
                assert peer.recv(2) == b"hi"
                report = sockrepair.migrate(server.pid, handoff=lambda socks, _tuples: handed.extend(socks))
            assert report.connections and len(handed) == 1
            assert os.get_blocking(handed[0].fileno())
            peer.sendall(b"after")
            assert os.read(handed[0].fileno(), 5) == b"after"
        finally:
            for s in [peer, *handed]:
                if s is not None:
                    s.close()
            stop(server)
