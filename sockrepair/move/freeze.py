"""Freezing a process while its sockets are read: the cgroup v2 freezer when the process has a cgroup of its own,
SIGSTOP otherwise. A context manager, so the process is thawed on every way out, errors included."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from sockrepair.move.procfs import ProcessError

CGROUP_ROOT = Path("/sys/fs/cgroup")
FREEZE_TIMEOUT = 5.0


def _cgroup_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except FileNotFoundError:
        raise ProcessError(f"no such process: {pid}") from None
    return None


def freezer_for(pid: int) -> Path | None:
    """The cgroup directory to freeze, or None when freezing it would also freeze this process (or everything)."""
    group = _cgroup_of(pid)
    if not group or group == "/" or group == _cgroup_of(os.getpid()):
        return None
    path = CGROUP_ROOT / group.lstrip("/")
    return path if (path / "cgroup.freeze").exists() else None


def _wait(predicate: object, what: str) -> None:
    deadline = time.monotonic() + FREEZE_TIMEOUT
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise ProcessError(f"{what} did not happen within {FREEZE_TIMEOUT:.0f} s")
        time.sleep(0.0002)


def _all_threads_stopped(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessError(f"process {pid} exited while being frozen") from None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[str]:
    """Yields the method used ("cgroup" or "sigstop")."""
    group = freezer_for(pid)
    if group is not None:
        (group / "cgroup.freeze").write_text("1")
        try:
            _wait(lambda: "frozen 1" in (group / "cgroup.events").read_text(), f"freezing cgroup {group}")
            yield "cgroup"
        finally:
            (group / "cgroup.freeze").write_text("0")
        return
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        raise ProcessError(f"no such process: {pid}") from None
    except PermissionError:
        raise ProcessError(f"not permitted to stop process {pid} (run as root)") from None
    try:
        _wait(lambda: _all_threads_stopped(pid),
              f"stopping process {pid}" + (" (the init of a pid namespace ignores SIGSTOP)" if pid == 1 else ""))
        yield "sigstop"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
