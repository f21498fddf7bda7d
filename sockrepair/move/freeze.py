"""Freezing a process while its sockets are read: the cgroup v2 freezer when the process has a cgroup of its own,
SIGSTOP otherwise. A context manager, so the process is thawed on every way out, errors included."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sockrepair.errors import ProcessError
from sockrepair.move.procfs import cgroup, thread_stats

CGROUP_ROOT = Path("/sys/fs/cgroup")
FREEZE_TIMEOUT = 5.0


def freezer_for(pid: int) -> Path | None:
    """The cgroup directory to freeze, or None when freezing it would also freeze this process (or everything)."""
    group = cgroup(pid)
    if not group or group == "/" or group == cgroup(os.getpid()):
        return None
    path = CGROUP_ROOT / group.lstrip("/")
    return path if (path / "cgroup.freeze").exists() else None


def _wait(pid: int, predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + FREEZE_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise ProcessError(f"{what} did not happen within {FREEZE_TIMEOUT:.0f} s", pid=pid)
        time.sleep(0.0002)


def _all_threads_stopped(pid: int) -> bool:
    try:
        return all(st.stopped for st in thread_stats(pid))
    except ProcessError:
        raise ProcessError(f"process {pid} exited while being frozen", pid=pid) from None


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[str]:
    """Yields the method used ("cgroup" or "sigstop"). Raises ProcessError (gone, not permitted, or not stopped
    within FREEZE_TIMEOUT seconds)."""
    group = freezer_for(pid)
    if group is not None:
        (group / "cgroup.freeze").write_text("1")
        try:
            _wait(pid, lambda: "frozen 1" in (group / "cgroup.events").read_text(), f"freezing cgroup {group}")
            yield "cgroup"
        finally:
            (group / "cgroup.freeze").write_text("0")
        return
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        raise ProcessError(f"no such process: {pid}", pid=pid) from None
    except PermissionError:
        raise ProcessError(f"not permitted to stop process {pid} (run as root)", pid=pid) from None
    try:
        _wait(pid, lambda: _all_threads_stopped(pid),
              f"stopping process {pid}" + (" (the init of a pid namespace ignores SIGSTOP)" if pid == 1 else ""))
        yield "sigstop"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
