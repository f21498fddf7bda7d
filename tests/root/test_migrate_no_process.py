"""migrate() of a pid that names no process raises ProcessError "no such process" (as its docstring and `sockrepair
dump` say), not a NetnsError about /proc/PID/ns/net that sends the caller to `ip netns list`; nothing is locked."""

from __future__ import annotations

import subprocess

import pytest

import sockrepair
from sockrepair.netns import NetNS


def _reaped_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("which", ["reaped", "huge", "negative", "zero"])
def test_migrate_of_no_process_is_a_process_error(netns: NetNS, which: str) -> None:
    pid = {"reaped": _reaped_pid(), "huge": 2**40, "negative": -1, "zero": 0}[which]
    with pytest.raises(sockrepair.ProcessError, match=rf"^no such process: {pid}$") as caught:
        sockrepair.migrate(pid, handoff=lambda socks, tuples: None)
    assert caught.value.pid == pid
    assert sockrepair.list_locks() == []
