"""checkpoint's sock_diag request (the refusal checks, and the state read again in repair mode) goes first to the
netlink socket of the namespace this thread asked last, naming the socket by its cookie: a socket with the same
4-tuple in that namespace must not answer for it."""

from __future__ import annotations

import socket
import struct
import time

import sockrepair
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
    return struct.unpack_from("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8))[0]


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
