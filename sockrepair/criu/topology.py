"""Which established TCP connections a set of process trees holds, and where the other end of each one lives:
in one of the trees, in a process outside them on this host (a loopback peer that a dump would leave behind), or
elsewhere. Taken before a dump: it says what the lock must cover and which dumps would break a connection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sockrepair.errors import CriuError, ProcessError
from sockrepair.move.procfs import (
    ProcStat,
    all_stats,
    descendants,
    describe,
    netns_inode,
    socket_inodes,
    tcp_table,
)
from sockrepair.state import TCP_CLOSE, TCP_LISTEN, ConnTuple

PEER_TREE = "tree"
PEER_EXTERNAL = "external"
PEER_REMOTE = "remote"


@dataclass(frozen=True)
class Holder:
    pid: int
    fd: int


@dataclass
class Connection:
    """One established socket of the trees. `peer` is PEER_TREE (the other end is in tree `peer_root`),
    PEER_EXTERNAL (the other end is a socket of this namespace held by `peer_pids`, outside every tree) or
    PEER_REMOTE (no socket here has the reversed tuple: the peer is another host or namespace)."""

    tuple: ConnTuple
    inode: int
    root: int
    holders: list[Holder]
    peer: str
    peer_root: int | None = None
    peer_inode: int = 0
    peer_pids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tuple": str(self.tuple), "root": self.root, "holders": [h.__dict__ for h in self.holders],
                "peer": self.peer, "peer_root": self.peer_root, "peer_pids": self.peer_pids}


@dataclass
class Tree:
    root: int
    pids: list[int]
    stats: dict[int, ProcStat]

    @property
    def command(self) -> str:
        return self.stats[self.root].comm

    @property
    def needs_shell_job(self) -> bool:
        """criu refuses a tree whose session or process group leader is outside it unless given --shell-job."""
        st = self.stats[self.root]
        return st.session not in self.pids or st.pgrp not in self.pids


@dataclass
class Topology:
    trees: list[Tree]
    connections: list[Connection]
    netns: int

    def tuples(self) -> list[ConnTuple]:
        return [c.tuple for c in self.connections]

    def external(self) -> list[Connection]:
        return [c for c in self.connections if c.peer == PEER_EXTERNAL]

    def of_tree(self, root: int) -> list[Connection]:
        return [c for c in self.connections if c.root == root]

    def left_behind(self) -> str:
        """Why dumping these trees alone would break connections: one line per loopback peer outside them."""
        lines = []
        for c in self.external():
            who = ", ".join(describe(p) for p in c.peer_pids) or "no process (an orphaned socket)"
            lines.append(f"{c.tuple} of tree {c.root} (pid {c.holders[0].pid} fd {c.holders[0].fd}): "
                         f"its other end is held by {who}, outside the dumped trees")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"netns": self.netns,
                "trees": [{"root": t.root, "pids": t.pids, "command": t.command} for t in self.trees],
                "connections": [c.to_dict() for c in self.connections]}


def _trees(roots: Sequence[int], stats: dict[int, ProcStat]) -> list[Tree]:
    trees: list[Tree] = []
    seen: dict[int, int] = {}
    for root in roots:
        if root not in stats:
            raise CriuError(f"no process {root} to dump")
        if stats[root].zombie:
            raise CriuError(f"process {describe(root)} has exited (a zombie): nothing to dump")
        pids = descendants(root, stats)
        for pid in pids:
            if pid in seen:
                raise CriuError(f"process {describe(pid)} is in the tree of {seen[pid]} and of {root}: give each "
                                "tree once, by its root")
            seen[pid] = root
        trees.append(Tree(root, pids, {p: stats[p] for p in pids}))
    return trees


def _holders(pids: Sequence[int]) -> dict[int, list[Holder]]:
    """socket inode -> every (pid, fd) that has it open."""
    found: dict[int, list[Holder]] = {}
    for pid in pids:
        try:
            inodes = socket_inodes(pid)
        except ProcessError:
            continue  # exited while we looked; criu will not dump it either
        for fd, ino in sorted(inodes.items()):
            found.setdefault(ino, []).append(Holder(pid, fd))
    return found


def _outside_holders(netns: int, inodes: set[int], skip: set[int], stats: dict[int, ProcStat]) -> dict[int, list[int]]:
    """For the peer sockets in `inodes`: the processes of the same namespace, outside the trees, holding them."""
    found: dict[int, list[int]] = {}
    if not inodes:
        return found
    for pid in stats:
        if pid in skip:
            continue
        try:
            if netns_inode(pid) != netns:
                continue
            held = socket_inodes(pid)
        except (OSError, ProcessError):
            continue
        for ino in set(held.values()) & inodes:
            found.setdefault(ino, []).append(pid)
    return found


def map_trees(roots: Sequence[int]) -> Topology:
    """The trees rooted at `roots` (all pids, via each process's parent) and their connections, in every state but
    LISTEN and CLOSE.
    All trees must share one network namespace: their loopback connections and the lock live there."""
    if not roots:
        raise CriuError("no process tree to dump: give at least one --pid")
    if len(set(roots)) != len(roots):
        raise CriuError("the same --pid is given twice")
    stats = all_stats()
    trees = _trees(roots, stats)
    spaces = {t.root: netns_inode(t.root) for t in trees}
    if len(set(spaces.values())) > 1:
        raise CriuError("the trees are in different network namespaces "
                        f"({', '.join(f'{r}: net:[{n}]' for r, n in spaces.items())}): dump each namespace's trees "
                        "with its own `sockrepair criu dump`")
    netns = spaces[trees[0].root]
    table = tcp_table(trees[0].root)
    by_wire = {conn.wire(): (ino, st) for ino, (conn, st) in table.items()}
    tree_of_inode: dict[int, int] = {}
    held: dict[int, list[Holder]] = {}
    for tree in trees:
        for ino, holders in _holders(tree.pids).items():
            if ino in table:
                tree_of_inode.setdefault(ino, tree.root)
                held.setdefault(ino, []).extend(holders)
    connections = []
    for ino, root in tree_of_inode.items():
        conn, state = table[ino]
        if state in (TCP_LISTEN, TCP_CLOSE):
            continue  # no connection: nothing on the wire to lock or to leave behind
        peer = by_wire.get(conn.wire().reversed())
        if peer is None or peer[0] == 0:
            # no socket here, or one no process holds any more (TIME_WAIT, an orphan closing): nothing to leave
            # behind
            connections.append(Connection(conn, ino, root, held[ino], PEER_REMOTE))
        elif peer[0] in tree_of_inode:
            connections.append(Connection(conn, ino, root, held[ino], PEER_TREE, tree_of_inode[peer[0]]))
        else:
            connections.append(Connection(conn, ino, root, held[ino], PEER_EXTERNAL, peer_inode=peer[0]))
    external = [c for c in connections if c.peer == PEER_EXTERNAL]
    outside = _outside_holders(netns, {c.peer_inode for c in external}, {p for t in trees for p in t.pids}, stats)
    for c in external:
        c.peer_pids = sorted(outside.get(c.peer_inode, []))
    return Topology(trees, sorted(connections, key=lambda c: (c.root, c.tuple)), netns)
