"""checkpoint's sock_diag request (the refusal checks, and the state read again in repair mode) goes first to the
netlink socket of the namespace this thread asked last, naming the socket by its cookie: a socket with the same
4-tuple in that namespace must not answer for it."""

from __future__ import annotations

import socket
import time

import sockrepair
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.netns import NetNS

TCP_ESTABLISHED, TCP_CLOSE_WAIT = 1, 8
SERVER, CLIENT = ("127.0.0.1", 40111), ("127.0.0.1", 40112)


def _pair() -> tuple[socket.socket, socket.socket]:
    """(client, server) with the same 4-tuple in every namespace."""
    with socket.socket() as listener:
        listener.bind(SERVER)
        listener.listen(1)
        client = socket.socket()
        client.bind(CLIENT)
        client.connect(SERVER)
        server, _ = listener.accept()
    return client, server


def _state(sock: socket.socket) -> int:
    return tcpinfo.read(sock, "tcpi_state")[0]


def test_a_socket_with_the_same_tuple_in_another_namespace_does_not_answer_for_it() -> None:
    socks: list[socket.socket] = []
    with NetNS() as a, NetNS() as b:
        try:
            with a.entered():
                socks += _pair()
            with b.entered():
                socks += _pair()
            a_server, b_client, b_server = socks[1], socks[2], socks[3]
            b_client.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 5
            while _state(b_server) != TCP_CLOSE_WAIT and time.monotonic() < deadline:
                time.sleep(0.001)
            assert _state(b_server) == TCP_CLOSE_WAIT
            first = sockrepair.checkpoint(a_server)  # this thread now holds a sock_diag socket in namespace a
            sockrepair.resume(a_server)
            second = sockrepair.checkpoint(b_server)  # namespace a holds the same 4-tuple, ESTABLISHED
            sockrepair.resume(b_server)
            assert (first.tcp_state, second.tcp_state) == (TCP_ESTABLISHED, TCP_CLOSE_WAIT)
            assert first.tuple == second.tuple
        finally:
            for s in socks:
                s.close()


def test_an_accepted_link_local_connection_is_read_as_itself_not_as_its_listener(
        two_hosts: tuple[NetNS, NetNS]) -> None:
    # bound to its scope's device, the accepted socket is missed by a lookup without that device, which falls
    # back to the listener: its accept queue (one connection waits in it) read as this socket's receive queue was
    # "an urgent mark 0 bytes into the 1-byte receive queue", or the state "now LISTEN"
    a, b = two_hosts
    a.ip("addr", "add", "fe80::1/64", "dev", "va", "nodad")
    b.ip("addr", "add", "fe80::2/64", "dev", "vb", "nodad")
    socks: list[socket.socket] = []
    try:
        with a.entered():
            listener = socket.socket(socket.AF_INET6)
            socks.append(listener)
            listener.bind(("::", 40113))
            listener.listen(4)
        with b.entered():
            scope = socket.if_nametoindex("vb")
            for _ in range(2):
                peer = socket.socket(socket.AF_INET6)
                socks.append(peer)
                peer.connect(("fe80::1", 40113, 0, scope))
        client, waiting = socks[1], socks[2]
        server, _ = listener.accept()
        socks.append(server)
        client.sendall(b"link-local")
        deadline = time.monotonic() + 5
        while len(server.recv(64, socket.MSG_PEEK)) < 10 and time.monotonic() < deadline:
            time.sleep(0.001)
        state = sockrepair.checkpoint(server)
        assert (state.tcp_state, state.tuple.remote_addr, state.tuple.local_port) == (TCP_ESTABLISHED, "fe80::2",
                                                                                       40113)
        assert bytes(state.recv_queue) == b"link-local"
        sockrepair.discard(server, state)
        with a.entered():
            moved = sockrepair.restore(state)
        socks.append(moved)
        assert moved.recv(64) == b"link-local"
        moved.sendall(b"back")
        assert client.recv(64) == b"back"
        assert waiting.getpeername()[0] == "fe80::1"
    finally:
        for s in socks:
            s.close()
