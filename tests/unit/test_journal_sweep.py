"""A migrate() killed before its point of no return leaves its journal (the program went on, the guard thawed it):
the next move's new_directory() removes such journals, and only those."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from sockrepair.move.journal import ABANDONED_AFTER, COMPLETED, ENDED, sweep_abandoned
from sockrepair.move.procfs import stat


def _journal(parent: Path, name: str, age: float, ended: bool = False, completed: bool = False) -> Path:
    d = parent / name
    d.mkdir(mode=0o700)
    (d / "journal.img").write_bytes(b"payload")
    if ended:
        (d / ENDED).write_text("1\n")
    if completed:
        (d / COMPLETED).write_text("1\n")
    then = time.time() - age
    os.utime(d, (then, then))
    return d


def test_only_old_unheld_journals_without_ended_go(tmp_path: Path) -> None:
    old = ABANDONED_AFTER + 10
    abandoned = _journal(tmp_path, "move-1-aaaa", old)
    ended = _journal(tmp_path, "move-2-bbbb", old, ended=True)
    young = _journal(tmp_path, "move-3-cccc", 1.0)
    held = _journal(tmp_path, "move-4-dddd", old)
    other = _journal(tmp_path, "dump-dir", old)
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert sweep_abandoned(tmp_path) == [abandoned]
    finally:
        os.close(fd)
    assert not abandoned.exists()
    assert all(d.exists() for d in (ended, young, held, other))


def test_journals_a_restore_completed_go_too(tmp_path: Path) -> None:
    """`sockrepair restore -D` of a killed migrate()'s journal marks it completed and leaves it (payload bytes in
    /run, in memory): the next move removes it once it is old enough and unheld; an ended one it did not complete
    stays."""
    old = ABANDONED_AFTER + 10
    completed = _journal(tmp_path, "move-5-eeee", old, ended=True, completed=True)
    young = _journal(tmp_path, "move-6-ffff", 1.0, ended=True, completed=True)
    pending = _journal(tmp_path, "move-7-gggg", old, ended=True)
    assert sweep_abandoned(tmp_path) == [completed]
    assert not completed.exists()
    assert young.exists() and pending.exists() and (pending / "journal.img").read_bytes() == b"payload"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_another_users_move_directories_stay(tmp_path: Path) -> None:
    """When /run cannot be written the parent is the system's temporary directory, which every user writes: a
    move-* there that is not the caller's (nor a directory) is left alone, whatever its age."""
    old = ABANDONED_AFTER + 10
    theirs = _journal(tmp_path, "move-8-hhhh", old)
    os.chown(theirs, 65534, 65534)
    then = time.time() - old
    os.utime(theirs, (then, then))
    (tmp_path / "move-9-iiii").write_bytes(b"a file")
    os.utime(tmp_path / "move-9-iiii", (then, then))
    ours = _journal(tmp_path, "move-10-jjjj", old)
    assert sweep_abandoned(tmp_path) == [ours]
    assert (theirs / "journal.img").read_bytes() == b"payload"
    assert (tmp_path / "move-9-iiii").read_bytes() == b"a file"


def _index(directory: Path, pid: int, start_time: int | None, lock_expires: float) -> None:
    source = {"pid": pid, "command": "x", "host": "h", "start_time": start_time, "after": "kill",
              "lock_expires": lock_expires, "netns": ""}
    (directory / "journal.json").write_text(json.dumps({"version": 1, "created": time.time(), "source": source,
                                                        "connections": []}))
    then = time.time() - ABANDONED_AFTER - 10
    os.utime(directory, (then, then))


def test_a_journal_without_ended_whose_source_is_gone_stays_while_its_lock_holds(tmp_path: Path) -> None:
    """The mover may die between telling its guard to end the source and writing ENDED: those images are the only
    copy of the connections (restore -D --force) until the lock expires. One whose source still runs was undone."""
    old = ABANDONED_AFTER + 10
    gone = _journal(tmp_path, "move-11-kkkk", old)
    _index(gone, 2**22 + 12345, 1, time.time() + 300)  # no such process
    running = _journal(tmp_path, "move-12-llll", old)
    me = stat(os.getpid())
    assert me is not None
    _index(running, os.getpid(), me.starttime, time.time() + 300)
    expired = _journal(tmp_path, "move-13-mmmm", old)
    _index(expired, 2**22 + 12345, 1, time.time() - 1)
    assert sorted(sweep_abandoned(tmp_path)) == sorted([running, expired])
    assert gone.exists()


def test_a_completed_journal_is_renamed_before_it_is_removed_and_a_half_removed_one_is_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mark_completed() of a journal the move created renames it first, so that a guard looking meanwhile never
    finds a journal with some of its files gone (completed() is True at once); killed inside the removal, what it
    left is swept by the next move whatever its age, and listed as no journal."""
    import shutil

    from sockrepair.move import journal

    made = _journal(tmp_path, "move-11-kkkk", 0.0, ended=True)
    seen: list[tuple[bool, bool]] = []

    def killed_halfway(path: Path, ignore_errors: bool = False) -> None:
        seen.append((journal.completed(made), path.name.startswith(journal.REMOVED_PREFIX)))
        (path / "journal.img").unlink()  # the removal stops here

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    journal.mark_completed(made, created=True)
    assert seen == [(True, True)]
    left = tmp_path / (journal.REMOVED_PREFIX + made.name)
    assert left.is_dir() and (left / ENDED).exists()
    monkeypatch.undo()
    assert sweep_abandoned(tmp_path) == [left]
    assert not left.exists()
