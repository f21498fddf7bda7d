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
