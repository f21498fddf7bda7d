"""When a batch checkpoint reads a sock_diag dump: from dump_pays_from() sockets on (a dump walks the whole
established hash table), shorter batches one socket at a time. The dump lists only the sockets on the batch's local
ports, through a filter the kernel runs (sockrepair.engine._diag.ports_filter); a batch on more ports than the
filter takes reads an unfiltered dump."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from sockrepair.engine import _batch, resume
from sockrepair.engine._batch import checkpoint_many
from sockrepair.engine._diag import FILTER_PORTS_MAX, dump_views
from sockrepair.engine._session import _Session

ESTABLISHED_BIT = 1 << 1


@pytest.fixture
def servers(netns) -> Iterator[list[tuple[int, socket.socket, socket.socket]]]:
    """Five listeners, each with one connection: (listening port, client, accepted server side)."""
    made: list[socket.socket] = []
    found = []
    try:
        for _ in range(5):
            listener = socket.socket()
            made.append(listener)
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            client = socket.create_connection(listener.getsockname())
            made.append(client)
            server, _ = listener.accept()
            made.append(server)
            found.append((listener.getsockname()[1], client, server))
        yield found
    finally:
        for sock in made:
            sock.close()


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


@pytest.mark.parametrize("picked", [[0], [1, 3], [0, 1, 2, 3, 4]])
def test_a_filtered_dump_lists_only_the_sockets_on_its_local_ports(servers, picked: list[int]) -> None:
    every = {_inode(s): s for _, client, server in servers for s in (client, server)}
    session = _Session(servers[0][1].fileno())
    assert len(dump_views(session, {socket.AF_INET}, ESTABLISHED_BIT, set(every))) == 10
    ports = [servers[i][0] for i in picked]
    views = dump_views(session, {socket.AF_INET}, ESTABLISHED_BIT, set(every), ports)
    assert set(views) == {_inode(servers[i][2]) for i in picked}
    assert sorted(v.tuple.local_port for v in views.values()) == sorted(ports)


@pytest.mark.parametrize("at", [0, FILTER_PORTS_MAX - 1])
def test_the_longest_filter_finds_its_port_first_or_last(servers, at: int) -> None:
    # ports no socket is on around the one that has one: every test and jump of the longest program is run
    port, _, server = servers[2]
    free = [p for p in range(40000, 41000) if p not in {s[0] for s in servers}][: FILTER_PORTS_MAX - 1]
    ports = free[:at] + [port] + free[at:]
    assert len(ports) == FILTER_PORTS_MAX
    session = _Session(server.fileno())
    views = dump_views(session, {socket.AF_INET}, ESTABLISHED_BIT, {_inode(server)}, ports)
    assert list(views) == [_inode(server)]
    assert dump_views(session, {socket.AF_INET}, ESTABLISHED_BIT, {_inode(server)}, free) == {}


def test_a_batch_on_more_ports_than_the_filter_takes_is_read_whole(netns, monkeypatch) -> None:
    made: list[socket.socket] = []
    asked: list[set[int]] = []
    real = _batch.dump_views

    def seen(session, families, states, inodes, ports=()):
        asked.append(set(ports))
        return real(session, families, states, inodes, ports)

    monkeypatch.setattr(_batch, "dump_pays_from", lambda: 1)
    monkeypatch.setattr(_batch, "dump_views", seen)
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            clients = [socket.create_connection(listener.getsockname()) for _ in range(FILTER_PORTS_MAX + 2)]
            made += clients
            made += [listener.accept()[0] for _ in clients]
        states = checkpoint_many(clients)
        for client in clients:
            resume(client)
        assert [st.tuple.local_port for st in states] == [c.getsockname()[1] for c in clients]
        assert [st.tuple.remote_port for st in states] == [c.getpeername()[1] for c in clients]
        assert asked == [set()]
    finally:
        for sock in made:
            sock.close()


def test_the_threshold_follows_the_established_hash_table_s_size() -> None:
    with open("/proc/sys/net/ipv4/tcp_ehash_entries") as f:
        buckets = abs(int(f.read()))
    assert _batch.dump_pays_from() == buckets // _batch.BUCKETS_PER_SOCKET


@pytest.mark.parametrize(("threshold", "dumps"), [(6, 0), (5, 1)])
def test_a_batch_shorter_than_the_threshold_reads_no_dump(servers, monkeypatch, threshold: int, dumps: int) -> None:
    made: list[int] = []
    real = _batch.dump_views

    def counted(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_batch, "dump_pays_from", lambda: threshold)
    monkeypatch.setattr(_batch, "dump_views", counted)
    socks = [server for _, _, server in servers]
    states = checkpoint_many(socks)
    for sock in socks:
        resume(sock)
    assert len(made) == dumps
    assert [st.tuple.local_port for st in states] == [port for port, _, _ in servers]
    assert [st.tuple.remote_port for st in states] == [client.getsockname()[1] for _, client, _ in servers]
