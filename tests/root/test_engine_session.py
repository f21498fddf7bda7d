"""What the engine remembers between checkpoint and resume/discard (the application's SO_REUSEADDR, which repair mode
forces and leaving it clears) belongs to the socket, not to its fd number."""

from __future__ import annotations

import os
import socket
import time

import pytest

import sockrepair
from sockrepair.engine import _session
from sockrepair.engine._repair import repair_on


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _reuse(sock: socket.socket | int) -> int:
    fd = sock if isinstance(sock, int) else sock.fileno()
    with socket.socket(fileno=os.dup(fd)) as view:
        return view.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)


@pytest.mark.parametrize("reuse", [0, 1])
def test_resume_puts_back_the_applications_reuse_flag(make_pair, reuse):
    client, server = make_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
    sockrepair.checkpoint(server)
    sockrepair.resume(server)
    assert _reuse(server) == reuse
    assert _inode(server) not in _session._reuse_held
    server.sendall(b"on")
    assert client.recv(10) == b"on"


def test_resume_through_another_fd_of_the_same_socket(make_pair):
    _, server = make_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sockrepair.checkpoint(server)
    other = os.dup(server.fileno())
    try:
        sockrepair.resume(other)
    finally:
        os.close(other)
    assert _reuse(server) == 1
    assert _inode(server) not in _session._reuse_held


def test_discard_forgets_the_socket(make_pair):
    _, server = make_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    state = sockrepair.checkpoint(server)
    inode = _inode(server)
    assert inode in _session._reuse_held
    sockrepair.discard(server, state)
    assert inode not in _session._reuse_held


def test_a_reused_fd_number_does_not_inherit_the_reuse_flag(make_pair):
    """A checkpointed socket whose discard was refused and which was then closed leaves its memory behind; another
    socket given the same fd number, frozen by other means and resumed, must not get SO_REUSEADDR from it."""
    client, first = make_pair()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    state = sockrepair.checkpoint(first)
    client.sendall(b"late")  # lands in the frozen socket: its state goes stale
    time.sleep(0.05)
    with pytest.raises(sockrepair.SocketStateError, match="changed since its checkpoint"):
        sockrepair.discard(first, state)
    number, first_inode = first.fileno(), _inode(first)
    other_client, other = make_pair()
    assert _reuse(other) == 0
    # the frozen first socket goes away (silently: it is in repair mode) and its fd number now holds the other one
    os.dup2(other.fileno(), number)
    other.close()
    repair_on(number)
    sockrepair.resume(number)
    assert _reuse(number) == 0
    os.write(number, b"mine")
    assert other_client.recv(10) == b"mine"
    # closed while frozen, the first socket could not be forgotten: its memory stays, under its own identity
    assert first_inode in _session._reuse_held
    _session._reuse_held.discard(first_inode)


def test_checkpoint_leaves_the_fd_blocking_under_a_default_timeout(make_pair):
    """The engine makes its calls through a socket object of its own around the application's fd; made the plain
    way under socket.setdefaulttimeout(), such an object sets O_NONBLOCK on the fd (and polls before each call)."""
    import fcntl

    client, server = make_pair(server_rcvbuf=1 << 20)
    client.sendall(b"q" * (128 << 10))  # a queue the peek pool takes
    deadline = time.monotonic() + 10
    while _session._Session(server.fileno()).ioctl(0x541B, "SIOCINQ") < 128 << 10:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        state = sockrepair.checkpoint(server)
        sockrepair.resume(server)
    finally:
        socket.setdefaulttimeout(previous)
    assert state.recv_queue == b"q" * (128 << 10)
    assert fcntl.fcntl(server.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK == 0
    assert server.gettimeout() is None
    assert server.recv(4) == b"qqqq"
