"""sockrepair.move.land.passing_lock on fds (a dump that leaves its process running marks the process's own
sockets, pidfd_getfd copies sharing their open file descriptions): SO_MARK is SOCCR_MARK inside, the saved mark
after, and nothing else of the socket changes."""

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
