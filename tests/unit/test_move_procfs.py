"""The one /proc/PID/stat parser: comm may hold spaces and parentheses, the fields start after the LAST ')'."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from sockrepair.errors import ProcessError
from sockrepair.move import procfs
from sockrepair.move.procfs import parse_stat, process_name, stat, thread_stats

# A real line (fs/proc/array.c), with a comm made to mislead a parser that splits at the first ')' or at spaces.
LINE = ("20561 (x) S 1 (y z)) R 20559 20558 11229 0 -1 4194304 99 0 0 0 0 0 0 0 20 0 1 0 66453 3133440 389 "
        "18446744073709551615 94849290051584 94849290071465 140727510498240 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n")


def test_comm_with_spaces_and_parentheses_ends_at_the_last_paren() -> None:
    st = parse_stat(20561, LINE)
    assert st.comm == "x) S 1 (y z)"
    assert (st.state, st.ppid, st.pgrp, st.session, st.starttime) == ("R", 20559, 20558, 11229, 66453)
    assert not st.zombie and not st.stopped


def test_states_that_count_as_stopped_and_zombie() -> None:
    for state, stopped, zombie in (("T", True, False), ("t", True, False), ("Z", True, True), ("S", False, False)):
        st = parse_stat(1, LINE.replace(") R ", f") {state} "))
        assert (st.stopped, st.zombie) == (stopped, zombie), state


def test_a_live_process_that_names_itself_like_a_stat_line() -> None:
    name = "a) T 1 (b"  # comm is at most 15 bytes
    child = subprocess.Popen([sys.executable, "-c",
                              f"open('/proc/self/comm', 'w').write({name!r}); import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while (st := stat(child.pid)) is not None and st.comm != name and time.monotonic() < deadline:
            time.sleep(0.01)
        assert st is not None and st.comm == name
        assert st.ppid == os.getpid() and st.state in "RS" and not st.stopped
        assert process_name(child.pid) == name
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert stat(child.pid) is None


def test_thread_stats_lists_every_thread() -> None:
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        threads = thread_stats(os.getpid())
        assert {st.pid for st in threads} >= {os.getpid(), worker.native_id}
        assert all(not st.stopped for st in threads)
    finally:
        release.set()
        worker.join()


@pytest.mark.parametrize(("uid", "advice"), [(1000, "(run as root)"), (0, "(refused to root too: ")])
def test_fd_links_refused_per_link_is_not_an_empty_fd_table(monkeypatch: pytest.MonkeyPatch, uid: int,
                                                            advice: str) -> None:
    """Where the listing is allowed and the links are not (no ptrace access: pid 1 of some sandboxes, even for
    root), the process is not reported as holding nothing ("no TCP sockets")."""
    def refused(path: str) -> str:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(procfs.os, "readlink", refused)
    monkeypatch.setattr(procfs.os, "geteuid", lambda: uid)
    with pytest.raises(ProcessError) as caught:
        procfs.fd_links(os.getpid())
    assert str(caught.value).startswith(f"not permitted to read the fds of process {os.getpid()} {advice}")
    assert caught.value.pid == os.getpid()
