"""The few fields of /proc/PID/stat that dumping a process tree needs: parent, process group, session, state and
start time (which tells a reused pid from the process that had it)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def stat(pid: int) -> ProcStat | None:
    """None when no process has this pid (any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses: it ends at the last ')'.
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    return ProcStat(pid, head.partition("(")[2], fields[0], int(fields[1]), int(fields[2]), int(fields[3]),
                    int(fields[19]))


def all_stats() -> dict[int, ProcStat]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st is not None:
                found[st.pid] = st
    return found


def descendants(root: int, stats: dict[int, ProcStat]) -> list[int]:
    """`root` and every process below it, parents before children."""
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    order, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        order.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return order


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def describe(pid: int) -> str:
    st = stat(pid)
    return f"{pid} ({st.comm})" if st is not None else str(pid)
