"""What the one lock over dumped trees covers: each tuple waits for its own tree and its loopback peer's; it is
released once all of those are restored; it is renewed while a criu run goes on."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from sockrepair.criu import lockhold
from sockrepair.criu.images import load_connections
from sockrepair.criu.manifest import LockedConnection, Manifest, TreeRecord
from sockrepair.state import ConnTuple

DUMP = Path(__file__).resolve().parent.parent / "data" / "criu" / "dump-2pairs"
A = ConnTuple.parse("127.0.0.1:7022->127.0.0.1:40000")
B = A.reversed()
C = ConnTuple.parse("127.0.0.1:5000->192.0.2.1:80")


def test_release_waits_for_every_tree_a_connection_needs() -> None:
    waits = {A: {1, 2}, B: {1, 2}, C: {1}}
    assert lockhold.still_waiting(waits, []) == sorted([A, B, C])
    assert lockhold.releasable(waits, [1]) == [C]
    assert lockhold.still_waiting(waits, [1]) == sorted([A, B])
    assert lockhold.releasable(waits, [2, 1]) == sorted([A, B, C])
    assert lockhold.still_waiting(waits, [1, 2]) == []


def test_the_lock_is_planned_again_from_the_images(tmp_path: Path) -> None:
    shutil.copytree(DUMP, tmp_path / "tree-7")
    remote = LockedConnection(str(C), [7], "remote")
    manifest = Manifest("4.2.1", "skip", 600.0, 1, [TreeRecord(7, "tree-7", [7], [0], "holder", False, True)],
                        [remote])
    waits = lockhold.plan_from_images(manifest, tmp_path)
    states = load_connections(DUMP)
    assert sorted(waits) == sorted([s.tuple for s in states] + [C])
    assert all(roots == {7} for roots in waits.values())


def test_trees_not_dumped_add_nothing(tmp_path: Path) -> None:
    manifest = Manifest("4.2.1", "skip", 600.0, 1, [TreeRecord(7, "tree-7", [7], [0], "holder", False)], [])
    assert lockhold.plan_from_images(manifest, tmp_path) == {}


class CountingLocker:
    def __init__(self) -> None:
        self.calls: list[tuple[list[ConnTuple], float, int | None]] = []
        self.renewed = threading.Event()

    def lock(self, tuples: list[ConnTuple], ttl: float, group: int | None = None) -> int:
        self.calls.append((list(tuples), ttl, group))
        if len(self.calls) >= 3:
            self.renewed.set()
        return len(tuples)


def test_renewing_locks_at_once_and_again_until_the_block_ends() -> None:
    locker = CountingLocker()
    with lockhold.renewing(locker, [A, B], 0.03, 49430) as errors:  # type: ignore[arg-type]
        assert locker.calls[0] == ([A, B], 0.03, 49430)
        assert locker.renewed.wait(10)
    count = len(locker.calls)
    assert errors == []
    # every renewal keeps the peers' packets going to the dump's recorder
    assert all(call == ([A, B], 0.03, 49430) for call in locker.calls)
    threading.Event().wait(0.05)
    assert len(locker.calls) == count, "renewal must stop with the block"
