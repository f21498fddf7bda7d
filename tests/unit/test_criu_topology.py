"""Mapping process trees and their connections before a dump, on this test's own process and a child (no root
needed: a process may read its own and its children's /proc entries)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sockrepair.criu.topology import PEER_EXTERNAL, PEER_TREE, map_trees
from sockrepair.errors import CriuError
from sockrepair.move.procfs import ProcStat, descendants, stat
from sockrepair.state import ConnTuple


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def test_descendants_are_found_through_parents_in_breadth_order() -> None:
    stats = {p: ProcStat(p, "x", "S", parent, p, p, 0) for p, parent in
             [(1, 0), (10, 1), (11, 10), (12, 10), (13, 11), (20, 1)]}
    assert descendants(10, stats) == [10, 11, 12, 13]
    assert descendants(13, stats) == [13]


def test_stat_reads_this_process() -> None:
    me = stat(os.getpid())
    assert me is not None and me.ppid == os.getppid() and me.state in "RS" and not me.zombie
    assert stat(2**22 + 1) is None


def test_both_ends_in_one_tree_are_tree_peers(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    topo = map_trees([os.getpid()])
    mine = {c.tuple: c for c in topo.connections}
    for sock in (client, server):
        conn = mine[_tuple(sock)]
        assert conn.peer == PEER_TREE and conn.peer_root == os.getpid()
        assert [h.fd for h in conn.holders] == [sock.fileno()]
    assert topo.external() == [] and topo.left_behind() == ""


def test_a_peer_in_another_process_is_external_and_named(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                              pass_fds=[server.fileno()])
    try:
        server.close()  # only the child holds the server end now
        topo = map_trees([os.getpid()])
        conn = next(c for c in topo.connections if c.tuple == _tuple(client))
        # The child is in this process's tree: it is a tree peer, held by the child.
        assert conn.peer == PEER_TREE
        sub = map_trees([holder.pid])
        (theirs,) = [c for c in sub.connections if c.tuple == _tuple(client).reversed()]
        assert theirs.peer == PEER_EXTERNAL and theirs.peer_pids == [os.getpid()]
        assert f"held by {os.getpid()}" in sub.left_behind()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()


def test_bad_roots_are_refused() -> None:
    with pytest.raises(CriuError, match="at least one"):
        map_trees([])
    with pytest.raises(CriuError, match="twice"):
        map_trees([os.getpid(), os.getpid()])
    with pytest.raises(CriuError, match="no process"):
        map_trees([2**22 + 1])
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with pytest.raises(CriuError, match=f"{child.pid} .* is in the tree of {os.getpid()} and of {child.pid}"):
            map_trees([os.getpid(), child.pid])
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def _tuple(sock: socket.socket) -> ConnTuple:
    (la, lp), (ra, rp) = sock.getsockname(), sock.getpeername()
    return ConnTuple(socket.AF_INET, la, lp, ra, rp)
