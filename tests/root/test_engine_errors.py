"""Every refusal is a clear domain error that names the socket and the reason, and leaves nothing behind."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
import time

import pytest

import sockrepair
from sockrepair.state import ConnTuple

TCP_CLOSE, TCP_LISTEN = 7, 10


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_udp_socket_is_refused(netns):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(sockrepair.SocketStateError, match="not a TCP socket"):
            sockrepair.checkpoint(udp)


def test_unix_socket_is_refused(netns):
    a, b = socket.socketpair()
    with a, b, pytest.raises(sockrepair.SocketStateError, match="not a TCP socket"):
        sockrepair.checkpoint(a)


def test_pipe_and_closed_fd_are_refused(netns):
    r, w = os.pipe()
    try:
        with pytest.raises(sockrepair.SocketStateError, match=f"fd {r} is not a socket") as err:
            sockrepair.checkpoint(r)
        assert err.value.fd == r
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(sockrepair.SocketStateError, match="not an open file descriptor") as err:
        sockrepair.checkpoint(r)
    assert err.value.fd == r


def test_listening_socket_is_refused(netns):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with pytest.raises(sockrepair.SocketStateError, match="is a listening socket") as err:
            sockrepair.checkpoint(listener)
        assert (err.value.fd, err.value.tcp_state, err.value.tuple) == (listener.fileno(), TCP_LISTEN, None)


def _checkpoint_as_nobody(fd: int, out: multiprocessing.connection.Connection) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        sockrepair.checkpoint(fd)
    except sockrepair.SockrepairError as exc:
        out.send((type(exc).__name__, str(exc), getattr(exc, "fd", None)))
    else:
        out.send(("no error", "", None))


def test_without_cap_net_admin(make_pair):
    client, server = make_pair()
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_checkpoint_as_nobody, args=(server.fileno(), theirs))
    child.start()
    try:
        kind, message, fd = mine.recv()
    finally:
        child.join(10)
    assert kind == "NotPermittedError"
    assert fd == server.fileno()
    assert "CAP_NET_ADMIN" in message and f"fd {server.fileno()}" in message
    server.sendall(b"untouched")
    assert client.recv(20) == b"untouched"


def test_restore_onto_a_tuple_in_use_leaves_nothing(make_pair):
    client, server = make_pair()
    state = sockrepair.checkpoint(server)
    sockrepair.resume(server)
    fds = _open_fds()
    with pytest.raises(sockrepair.AddressInUseError, match=r"already holds this 4-tuple") as err:
        sockrepair.restore(state)
    assert str(state.tuple) in str(err.value)
    assert err.value.tuple == state.tuple
    assert _open_fds() == fds
    # the original connection did not notice
    server.sendall(b"still here")
    assert client.recv(20) == b"still here"
    client.sendall(b"and back")
    assert server.recv(20) == b"and back"


def test_restore_with_a_local_address_not_on_the_host(make_pair):
    client, server = make_pair(socket.AF_INET6, "::1")
    state = sockrepair.checkpoint(server)
    sockrepair.resume(server)
    # a documentation-prefix address: bind() refuses it before anything could reach the wire
    t = state.tuple
    moved = dataclasses.replace(state, tuple=ConnTuple(t.family, "2001:db8::1", t.local_port, t.remote_addr,
                                                       t.remote_port))
    fds = _open_fds()
    with pytest.raises(sockrepair.AddressNotLocalError, match=r"local address 2001:db8::1 is not configured") as err:
        sockrepair.restore(moved)
    assert err.value.tuple == moved.tuple
    assert _open_fds() == fds


def test_discard_refuses_a_state_that_went_stale(make_pair):
    client, server = make_pair()
    state = sockrepair.checkpoint(server)
    # the peer's data still lands in a frozen socket when no lock drops it
    client.sendall(b"late")
    time.sleep(0.05)
    with pytest.raises(sockrepair.SocketStateError, match="changed since its checkpoint") as err:
        sockrepair.discard(server, state)
    assert (err.value.fd, err.value.tuple) == (server.fileno(), state.tuple)
    sockrepair.resume(server)
    assert server.recv(10) == b"late"


def test_a_failed_kernel_call_in_restore_names_the_connection(make_pair):
    client, server = make_pair()
    state = sockrepair.checkpoint(server)
    sockrepair.discard(server, state)  # the 4-tuple must be free: congestion control is set after the connect
    moved = dataclasses.replace(state, sockopts=dataclasses.replace(state.sockopts, congestion="no-such-cc"))
    fds = _open_fds()
    with pytest.raises(sockrepair.SocketCallError, match="not available on this host") as err:
        sockrepair.restore(moved)
    assert err.value.tuple == state.tuple and err.value.op.startswith("setsockopt(TCP_CONGESTION")
    assert _open_fds() == fds
