"""The journal of a move (sockrepair.move.journal) and the fault-injection hook (sockrepair.move.stages), without
root: states made by hand, this very process as the "source"."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from sockrepair.errors import ImageError
from sockrepair.image import encode
from sockrepair.image.directory import NO_FD
from sockrepair.move import journal as journal_module
from sockrepair.move import stages
from sockrepair.move.journal import (
    COMPLETED,
    JOURNAL_IMAGES,
    JOURNAL_INDEX,
    append_journal,
    journal_head,
    load_states,
    mark_completed,
    mark_ended,
    note_relock,
    read_source,
    stale_reason,
    volatile,
    write_images,
    write_journal,
)
from sockrepair.move.stages import InjectedFault, Stage, Timings
from sockrepair.state import ConnectionState, ConnTuple
from tests.unit.test_image import base_state


def _states(n: int) -> list[ConnectionState]:
    return [base_state(tuple=ConnTuple(socket.AF_INET, "10.0.0.1", 1000 + i, "10.0.0.2", 80),
                       recv_queue=bytes([i]) * (10 + i)) for i in range(n)]


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_packed_journal_reads_back_and_is_private(tmp_path: Path) -> None:
    states = _states(3)
    write_journal(tmp_path / "j", _dead_pid(), [5, 6, 7], [encode(s) for s in states], [s.tuple for s in states],
                  ttl=30, netns="b")
    assert load_states(tmp_path / "j") == states
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "j").iterdir()} == {
        JOURNAL_IMAGES: 0o600, JOURNAL_INDEX: 0o600}
    assert (tmp_path / "j").stat().st_mode & 0o777 == 0o700
    src = read_source(tmp_path / "j")
    assert src.after == "kill" and src.netns == "b" and src.lock_expires is not None
    why = stale_reason(tmp_path / "j")  # the mover died before its point of no return: the program went on
    assert why is not None and "undone before its source was ended" in why
    mark_ended(tmp_path / "j")
    assert stale_reason(tmp_path / "j") is None


def test_a_head_found_before_the_freeze_is_what_the_journal_records(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # migrate() finds the head before the freeze; only the lock's expiry is taken when the journal is written
    states = _states(1)
    head = journal_head(tmp_path / "j", os.getpid(), "b")
    assert head.source["netns"] == "b" and head.source["pid"] == os.getpid() and head.durable
    monkeypatch.setattr(journal_module, "namespace_at", lambda *args: pytest.fail("the head was found again"))
    calls = _fsyncs(monkeypatch)
    before = time.time()
    write_journal(tmp_path / "j", os.getpid(), [5], [encode(s) for s in states], [s.tuple for s in states],
                  ttl=30, netns="b", head=head)
    src = read_source(tmp_path / "j")
    assert (src.pid, src.netns, src.start_time) == (os.getpid(), "b", head.source["start_time"])
    assert src.lock_expires is not None and before + 30 <= src.lock_expires <= time.time() + 30
    assert len(calls) == 3  # durable, as the head says: journal.img, journal.json, the directory


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)
    monkeypatch.setattr(os, "fsync", counted)
    return calls


def test_a_journal_the_caller_placed_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    states = _states(2)
    calls = _fsyncs(monkeypatch)
    write_journal(tmp_path / "j", _dead_pid(), [5, 6], [encode(s) for s in states], [s.tuple for s in states],
                  ttl=30, netns=None)
    mark_ended(tmp_path / "j")
    assert not volatile(tmp_path / "j")
    assert len(calls) == 4  # journal.img, journal.json, the directory, ended


def test_the_default_journal_under_run_is_written_but_not_fsynced(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # /run is cleared at boot: an fsync there cannot make the journal outlive a power cut, only stall the freeze
    monkeypatch.setattr(journal_module, "DEFAULT_PARENT", tmp_path / "run")
    directory = tmp_path / "run" / "move-1-x"
    states = _states(2)
    calls = _fsyncs(monkeypatch)
    write_journal(directory, _dead_pid(), [5, 6], [encode(s) for s in states], [s.tuple for s in states],
                  ttl=30, netns=None)
    mark_ended(directory)
    assert volatile(directory) and calls == []
    assert load_states(directory) == states
    assert {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()} == {
        JOURNAL_IMAGES: 0o600, JOURNAL_INDEX: 0o600, "ended": 0o600}


@pytest.mark.parametrize("durable", [True, False])
def test_the_end_mark_takes_the_heads_durability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 durable: bool) -> None:
    # migrate() passes JournalHead.durable, found before the freeze: the mark, inside it, does not resolve paths
    (tmp_path / "j").mkdir()
    monkeypatch.setattr(journal_module, "volatile", lambda _d: pytest.fail("volatile() asked inside the freeze"))
    calls = _fsyncs(monkeypatch)
    mark_ended(tmp_path / "j", durable)
    assert (tmp_path / "j" / "ended").stat().st_mode & 0o777 == 0o600
    assert len(calls) == (1 if durable else 0)


@pytest.mark.parametrize("placed", ["default", "caller's"])
def test_connections_appended_to_a_journal_read_back_after_the_others(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     placed: str) -> None:
    # migrate()'s backlog carried into another namespace: the first images stay byte for byte where they were
    monkeypatch.setattr(journal_module, "DEFAULT_PARENT", tmp_path / "run")
    directory = tmp_path / ("run" if placed == "default" else "mine") / "move-1-x"
    states = _states(4)
    write_journal(directory, _dead_pid(), [5, 6], [encode(s) for s in states[:2]], [s.tuple for s in states[:2]],
                  ttl=30, netns="b")
    before = (directory / JOURNAL_IMAGES).read_bytes()
    calls = _fsyncs(monkeypatch)
    append_journal(directory, [NO_FD, NO_FD], [encode(s) for s in states[2:]], [s.tuple for s in states[2:]])
    assert load_states(directory) == states
    assert (directory / JOURNAL_IMAGES).read_bytes().startswith(before)
    index = json.loads((directory / JOURNAL_INDEX).read_text())
    assert [c["fd"] for c in index["connections"]] == [5, 6, NO_FD, NO_FD]
    assert index["source"]["netns"] == "b"
    assert {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()} == {
        JOURNAL_IMAGES: 0o600, JOURNAL_INDEX: 0o600}
    # the caller's directory: journal.img, journal.json.part, the directory; under /run nothing
    assert len(calls) == (0 if placed == "default" else 3)


def test_an_append_that_fails_leaves_the_journal_as_it_was(tmp_path: Path) -> None:
    states = _states(3)
    directory = tmp_path / "j"
    write_journal(directory, _dead_pid(), [5, 6], [encode(s) for s in states[:2]], [s.tuple for s in states[:2]],
                  ttl=30, netns=None)
    (directory / (JOURNAL_INDEX + ".part")).mkdir()  # the new index cannot be written
    with pytest.raises(OSError):
        append_journal(directory, [NO_FD], [encode(states[2])], [states[2].tuple])
    assert load_states(directory) == states[:2]


def test_a_damaged_journal_names_the_image_and_the_byte(tmp_path: Path) -> None:
    states = _states(2)
    images = [encode(s) for s in states]
    write_journal(tmp_path, _dead_pid(), [5, 6], images, [s.tuple for s in states], ttl=30, netns=None)
    blob = bytearray((tmp_path / JOURNAL_IMAGES).read_bytes())
    blob[len(images[0]) + 3] ^= 0xFF
    (tmp_path / JOURNAL_IMAGES).write_bytes(bytes(blob))
    with pytest.raises(ImageError) as caught:
        load_states(tmp_path)
    assert caught.value.field == "connections[1].sha256" and caught.value.offset == len(images[0])
    (tmp_path / JOURNAL_IMAGES).write_bytes(bytes(blob[: len(images[0])]))
    with pytest.raises(ImageError, match="cut short"):
        load_states(tmp_path)


def test_a_dump_directory_reads_back_through_load_states(tmp_path: Path) -> None:
    states = _states(2)
    write_images(tmp_path / "d", _dead_pid(), list(zip([3, 4], states)), after="kill", ttl=30)
    assert load_states(tmp_path / "d") == states


def test_stale_reasons(tmp_path: Path) -> None:
    states = _states(1)
    # the "source" is this very process, still running: its connections went on
    write_images(tmp_path / "running", os.getpid(), [(3, states[0])], after="kill", ttl=30)
    why = stale_reason(tmp_path / "running")
    assert why is not None and f"process {os.getpid()} is still running" in why
    write_images(tmp_path / "left", _dead_pid(), [(3, states[0])], after="leave-running", ttl=30)
    why = stale_reason(tmp_path / "left")
    assert why is not None and "left the program running" in why
    write_images(tmp_path / "ok", _dead_pid(), [(3, states[0])], after="kill", ttl=30)
    why = stale_reason(tmp_path / "ok")
    assert why is not None and "undone before its source was ended" in why
    mark_ended(tmp_path / "ok")
    assert stale_reason(tmp_path / "ok") is None
    why = stale_reason(tmp_path / "ok", now=time.time() + 40)
    assert why is not None and "lock expired" in why
    note_relock(tmp_path / "ok", time.time() + 100)
    assert stale_reason(tmp_path / "ok", now=time.time() + 40) is None
    mark_completed(tmp_path / "ok", created=False)
    assert (tmp_path / "ok" / COMPLETED).exists()
    assert stale_reason(tmp_path / "ok") == "this move completed: its connections live on elsewhere"


def test_an_index_without_a_source_is_not_stale(tmp_path: Path) -> None:
    # images of an older dump record no source: nothing to judge them by
    write_images(tmp_path, _dead_pid(), [(3, _states(1)[0])], after="kill", ttl=30)
    index = json.loads((tmp_path / "index.json").read_text())
    index["source"] = {"pid": "x"}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert stale_reason(tmp_path) is None


def test_the_fault_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    timings = Timings("migrate")
    with timings.timed(Stage.FREEZE):
        pass
    monkeypatch.setenv(stages.FAULT_ENV, "migrate:lock:raise")
    with pytest.raises(InjectedFault) as caught, timings.timed(Stage.LOCK):
        raise AssertionError("the stage's work must not run")
    assert caught.value.point == "lock"
    monkeypatch.setenv(stages.FAULT_ENV, "migrate:lock.end:raise")
    ran = []
    with pytest.raises(InjectedFault), timings.timed(Stage.LOCK):
        ran.append(1)
    assert ran == [1]
    monkeypatch.setenv(stages.FAULT_ENV, "dump:lock:raise")  # another job: nothing happens
    with timings.timed(Stage.LOCK):
        pass
    monkeypatch.setenv(stages.FAULT_ENV, "migrate:lock:explode")
    with pytest.raises(ValueError, match="explode"), timings.timed(Stage.LOCK):
        pass


def test_killgroup_is_refused_to_a_mover_that_does_not_lead_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """The group would hold whatever started the mover (the test runner): only a group leader may kill it."""
    monkeypatch.setenv(stages.FAULT_ENV, "dump:lock:killgroup")
    child = os.fork()
    if child == 0:  # in this process's group, never its leader
        try:
            stages.inject("dump", "lock")
        except ValueError as exc:
            os._exit(0 if "leads its process group" in str(exc) else 2)
        os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_handed_connections_are_recorded_whole_and_added_up(tmp_path: Path) -> None:
    from sockrepair.move.journal import HANDED, mark_handed, read_handed

    assert read_handed(tmp_path) == set()
    a, b = (str(s.tuple) for s in _states(2))
    mark_handed(tmp_path, [a])
    mark_handed(tmp_path, [b, a])
    assert read_handed(tmp_path) == {a, b}
    assert json.loads((tmp_path / HANDED).read_text()) == sorted([a, b])
    assert sorted(p.name for p in tmp_path.iterdir()) == [HANDED]  # no temporary file left
    (tmp_path / HANDED).write_text('{"not": "a list"}')
    with pytest.raises(ImageError, match="not a list of connections"):
        read_handed(tmp_path)


def test_the_restore_guard_tells_a_live_process_from_one_on_its_way_out() -> None:
    from sockrepair.move.restoreguard import exiting

    assert not exiting(os.getpid())
    assert exiting(_dead_pid())
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not exiting(zombie):  # a zombie until reaped below
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        os.waitpid(zombie, 0)


def test_restore_is_a_job_with_fault_points(monkeypatch: pytest.MonkeyPatch) -> None:
    timings = Timings("restore")
    with timings.timed(Stage.LOAD):
        pass
    with pytest.raises(ValueError, match="restore has no stage 'freeze'"), timings.timed(Stage.FREEZE):
        pass
    monkeypatch.setenv(stages.FAULT_ENV, "restore:handoff.end:raise")
    with pytest.raises(InjectedFault, match="fault injected at restore handoff.end"), timings.timed(Stage.HANDOFF):
        pass
    assert list(timings.ms) == ["load", "handoff"]
