"""The one lock over every connection of the dumped trees: which tuples it covers and which trees each one waits
for, renewing it while a long criu run goes on, and what may be released once some trees are back."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from sockrepair.criu.images import load_connections
from sockrepair.criu.manifest import LockedConnection, Manifest
from sockrepair.criu.topology import PEER_TREE, Topology
from sockrepair.lock import Locker
from sockrepair.state import ConnTuple

log = logging.getLogger(__name__)

LABEL = "sockrepair-criu"
# Renew well before expiry: a renewal may wait behind a slow netlink transaction.
RENEW_FRACTION = 3


def plan_from_topology(topology: Topology) -> list[LockedConnection]:
    """Each tuple waits for its own tree and, for a loopback peer in another dumped tree, for that one too."""
    out = []
    for c in topology.connections:
        waits = [c.root] + ([c.peer_root] if c.peer == PEER_TREE and c.peer_root not in (None, c.root) else [])
        out.append(LockedConnection(str(c.tuple), waits, c.peer))
    return out


def plan_from_images(manifest: Manifest, directory: Path) -> dict[ConnTuple, set[int]]:
    """Tuple -> roots it waits for, from the images criu wrote (the truth after a reboot) merged with what the
    manifest recorded before the dump."""
    waits: dict[ConnTuple, set[int]] = {}
    owner: dict[ConnTuple, int] = {}
    for tree in manifest.trees:
        if not tree.dumped:
            continue
        for state in load_connections(directory / tree.dir):
            owner[state.tuple.wire()] = tree.root
            waits.setdefault(state.tuple, set()).add(tree.root)
    for conn in list(waits):
        peer_root = owner.get(conn.wire().reversed())
        if peer_root is not None:
            waits[conn].add(peer_root)
    for locked in manifest.connections:
        waits.setdefault(ConnTuple.parse(locked.tuple), set()).update(locked.waits_for)
    return waits


def still_waiting(waits: dict[ConnTuple, set[int]], restored: Iterable[int]) -> list[ConnTuple]:
    """The tuples (sorted) that wait for at least one root not in `restored`: they must stay locked."""
    done = set(restored)
    return sorted(conn for conn, roots in waits.items() if not roots <= done)


def releasable(waits: dict[ConnTuple, set[int]], restored: Iterable[int]) -> list[ConnTuple]:
    """The tuples (sorted) whose every root is in `restored`: their lock may be released."""
    done = set(restored)
    return sorted(conn for conn, roots in waits.items() if roots <= done)


@contextlib.contextmanager
def renewing(locker: Locker, tuples: Sequence[ConnTuple], ttl: float,
             group: int | None = None) -> Iterator[list[BaseException]]:
    """Lock `tuples` now (copying the peers' packets to nfnetlink_log `group`, the dump's recorder's) and renew
    every ttl/3 until the block ends (the lock itself stays: releasing is the caller's decision). Yields a list that
    collects renewal errors, for the caller to report."""
    errors: list[BaseException] = []
    locker.lock(tuples, ttl, group=group)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / RENEW_FRACTION):
            try:
                locker.lock(tuples, ttl, group=group)
            except Exception as exc:  # reported by the caller; the next round tries again
                log.warning("renewing the lock of %d connection(s) failed: %s", len(tuples), exc)
                errors.append(exc)

    thread = threading.Thread(target=renew, name="sockrepair-criu-lock", daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join()
