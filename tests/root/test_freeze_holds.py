"""The guard's holds of restored sockets (sockrepair.move.freeze.Freezer.hold_one): queued in the kernel without
waking the guard, read by it when the queue is full and when it is released. (When sockrepair is killed holding
them: tests/root/test_faults.py, migrate at restore.end and later.)"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from sockrepair.move import freeze
from sockrepair.move.freeze import Freezer


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def _inodes(socks: list[socket.socket]) -> set[int]:
    return {os.fstat(s.fileno()).st_ino for s in socks}


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_holds_beyond_a_full_queue_all_reach_the_guard_and_go_at_release(netns, sleeper, monkeypatch):
    # the smallest send buffer the kernel allows: the queue fills after a few holds, and hold_one() has the guard
    # take what is queued before it sends the next
    monkeypatch.setattr(freeze, "_HOLD_BUFFER", 1)
    socks = [socket.socket() for _ in range(300)]
    try:
        with Freezer(sleeper.pid) as guard:
            for sock in socks:
                guard.hold_one(sock)
            guard._ask("take")  # what the last full queue left unread
            assert _inodes(socks) <= _socket_inodes(guard.child)
            guard.release()
            assert not _inodes(socks) & _socket_inodes(guard.child)
    finally:
        for sock in socks:
            sock.close()


def test_the_thaw_of_a_killed_process_is_not_waited_for_and_the_reap_reads_its_answer(netns, sleeper):
    # the move's ending: the process is killed while frozen; its thaw is told, not asked (under ptrace the guard
    # answers only once the killed threads are collected), and the reap that follows reads both answers in order
    with Freezer(sleeper.pid) as guard:
        with guard.frozen() as method:
            guard.ending()
            sleeper.kill()
        assert guard._unanswered == 1, method
        guard.reap()
        assert guard._unanswered == 0
        assert sleeper.wait(timeout=5) == -9
        guard._ask("take")  # the channel is in step: the next answer is this request's own
