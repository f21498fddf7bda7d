"""One live connection handed back and forth between two processes as image bytes, 100 times, under traffic.

While the connection has no socket, the network lock drops the peer's packets: even a pure ACK of data in flight
reaching a 4-tuple with no socket would be answered with RST."""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import socket
from collections.abc import Callable

import sockrepair
from sockrepair.engine._addr import read_tuple
from sockrepair.engine._session import _Session
from sockrepair.lock import close_cached_lockers
from tests.root.streams import pattern, recv_exactly

HOPS = 100


def _stay(image: bytes, serve: Callable[[socket.socket], object]) -> bytes:
    """One stay of the connection in a process: restore, unlock, serve, lock, checkpoint, discard."""
    state = sockrepair.ConnectionState.from_bytes(image)
    sock = sockrepair.restore(state)
    sockrepair.unlock(state)
    serve(sock)
    sockrepair.lock(state.tuple, ttl=30)
    state = sockrepair.checkpoint(sock)
    sockrepair.discard(sock, state)
    return state.to_bytes()


def _other_process(link: multiprocessing.connection.Connection) -> None:
    def serve(sock: socket.socket) -> None:
        link.send("live")
        sock.sendall(recv_exactly(sock, link.recv()))
        link.recv()  # the client has the whole echo: the connection may move on

    while (image := link.recv()) is not None:
        link.send(_stay(image, serve))


def test_connection_moves_between_processes_as_bytes(make_pair):
    ctx = multiprocessing.get_context("fork")  # the child starts in this thread's network namespace
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_other_process, args=(theirs,))
    # forked before the connection exists: a child holding a copy of the socket would keep it alive after discard
    child.start()
    client, server = make_pair()
    sent, echoed = hashlib.sha256(), hashlib.sha256()
    offset = 0

    def answer(timeout: float = 20) -> object:
        assert mine.poll(timeout), f"the other process stopped answering (exit code {child.exitcode})"
        return mine.recv()

    try:
        sockrepair.lock(read_tuple(_Session(server.fileno())), ttl=30)
        state = sockrepair.checkpoint(server)
        sockrepair.discard(server, state)
        image = state.to_bytes()
        for hop in range(HOPS):
            chunk = pattern(offset, 3000 + 101 * hop, salt=21)
            offset += len(chunk)
            sent.update(chunk)
            if hop % 2 == 0:
                mine.send(image)
                assert answer() == "live"
                client.sendall(chunk)
                mine.send(len(chunk))
                echoed.update(recv_exactly(client, len(chunk)))
                mine.send("moved on")
                image = answer()
            else:

                def serve(sock: socket.socket, chunk: bytes = chunk) -> None:
                    client.sendall(chunk)
                    sock.sendall(recv_exactly(sock, len(chunk)))
                    echoed.update(recv_exactly(client, len(chunk)))

                image = _stay(image, serve)
        last = sockrepair.ConnectionState.from_bytes(image)
        final = sockrepair.restore(last)
        sockrepair.unlock(last)
        final.sendall(b"end")
        assert recv_exactly(client, 3) == b"end"
        final.close()
    finally:
        mine.send(None)
        child.join(10)
        close_cached_lockers()
    assert child.exitcode == 0
    assert echoed.hexdigest() == sent.hexdigest()
