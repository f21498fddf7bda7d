"""After `criu dump` killed a tree: make sure its pids are free again, because `criu restore` recreates every task
under its old pid and fails with "Can't fork for PID: File exists" while any of them is taken."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence

from sockrepair.move.procfs import describe, stat

REAP_TIMEOUT = 10.0


def taken(pids: Sequence[int], starttimes: Sequence[int] | None = None) -> list[str]:
    """Why each pid that is still in use is, one phrase per pid; [] when all are free. With `starttimes`, a process
    with a different start time is another process that got the pid."""
    out = []
    for i, pid in enumerate(pids):
        st = stat(pid)
        if st is None:
            continue
        if st.zombie:
            parent = stat(st.ppid)
            who = describe(st.ppid) if parent is not None else str(st.ppid)
            out.append(f"pid {pid} ({st.comm}) is a zombie that its parent {who} has not wait()ed for")
        elif starttimes is not None and st.starttime != starttimes[i]:
            out.append(f"pid {pid} now belongs to another process ({st.comm})")
        else:
            out.append(f"pid {pid} ({st.comm}) is still running")
    return out


def wait_free(pids: Sequence[int], starttimes: Sequence[int], timeout: float | None = None) -> list[str]:
    """Wait up to `timeout` (default REAP_TIMEOUT) for the pids to be free; what still holds one after that."""
    deadline = time.monotonic() + (REAP_TIMEOUT if timeout is None else timeout)
    while True:
        left = taken(pids, starttimes)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def reap(root: int, pids: Sequence[int], starttimes: Sequence[int], timeout: float | None = None) -> list[str]:
    """Wait for the dumped tree's pids to be free: the root is wait()ed for when it is our child, otherwise its
    parent must do it (an init that reaps late, too). Returns what still holds a pid after `timeout`."""
    st = stat(root)
    if st is not None and st.ppid == os.getpid():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(root, 0)
    return wait_free(pids, starttimes, timeout)
