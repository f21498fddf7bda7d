"""captured()'s look under the freeze (sockrepair.move.take._taken_if_same): the pidfd_getfd copies are kept only
when the process still has the sockets it had at the look, and are never left open otherwise."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sockrepair.errors import ProcessError
from sockrepair.move import take
from sockrepair.move.procfs import ProcSocket
from sockrepair.state import TCP_ESTABLISHED, ConnTuple


class _Copies:
    """A PidFd whose getfds() duplicates this process's fd (pidfd_getfd's effect), remembering every copy made."""

    def __init__(self) -> None:
        self.made: list[int] = []

    def getfds(self, fds: list[int]) -> list[int]:
        self.made += [os.dup(fd) for fd in fds]
        return list(self.made)


@pytest.fixture
def chosen() -> Iterator[list[ProcSocket]]:
    socks = [socket.socket(), socket.socket()]
    conn = ConnTuple(socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2)
    try:
        yield [ProcSocket(s.fileno(), os.fstat(s.fileno()).st_ino, conn, TCP_ESTABLISHED) for s in socks]
    finally:
        for s in socks:
            s.close()


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_same_sockets_keeps_the_copies(chosen: list[ProcSocket], monkeypatch: pytest.MonkeyPatch) -> None:
    # a file opened since the look (fd 3) is no socket the move could lose
    monkeypatch.setattr(take, "_other_fds", lambda pid, chosen: {3: "/dev/null", 9: "socket:[1]"})
    pidfd = _Copies()
    taken = take._taken_if_same(os.getpid(), pidfd, chosen, {9: "socket:[1]"})  # type: ignore[arg-type]
    try:
        assert taken == pidfd.made and len(taken) == 2
        assert [os.fstat(fd).st_ino for fd in taken] == [s.inode for s in chosen]
    finally:
        for fd in pidfd.made:
            os.close(fd)


def test_new_socket_closes_the_copies(chosen: list[ProcSocket], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(take, "_other_fds", lambda pid, chosen: {9: "socket:[1]", 10: "socket:[2]"})
    pidfd = _Copies()
    assert take._taken_if_same(os.getpid(), pidfd, chosen, {9: "socket:[1]"}) is None  # type: ignore[arg-type]
    assert len(pidfd.made) == 2 and not any(map(_open, pidfd.made))


def test_process_gone_closes_the_copies(chosen: list[ProcSocket], monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's fds cannot be read under the freeze (it died): no copy stays open (captured() used to read
    /proc/PID/fd after _taken_if_same() returned the copies, before anything owned them)."""

    def gone(pid: int, chosen: list[ProcSocket]) -> dict[int, str]:
        raise ProcessError(f"cannot read the fds of process {pid}", pid=pid)

    monkeypatch.setattr(take, "_other_fds", gone)
    pidfd = _Copies()
    with pytest.raises(ProcessError):
        take._taken_if_same(os.getpid(), pidfd, chosen, {})  # type: ignore[arg-type]
    assert len(pidfd.made) == 2 and not any(map(_open, pidfd.made))


def test_replaced_fd_closes_the_copies(chosen: list[ProcSocket]) -> None:
    pidfd = _Copies()
    moved = [chosen[0], ProcSocket(chosen[1].fd, chosen[1].inode + 1, chosen[1].tuple, TCP_ESTABLISHED)]
    assert take._taken_if_same(os.getpid(), pidfd, moved, {}) is None  # type: ignore[arg-type]
    assert len(pidfd.made) == 2 and not any(map(_open, pidfd.made))


def test_getfds_stops_at_the_first_fd_that_is_not_open(chosen: list[ProcSocket]) -> None:
    """PidFd.getfds (pidfd_getfd of each fd, here of this very process) stops short at a closed fd, and
    _taken_if_same then closes the copies it made."""
    from sockrepair.move.pidfd import PidFd

    # not open, and above every fd the copies may get
    closed = max(int(name) for name in os.listdir("/proc/self/fd")) + 100
    with PidFd(os.getpid()) as pidfd:
        copies = pidfd.getfds([chosen[0].fd, closed, chosen[1].fd])
        try:
            assert len(copies) == 1 and os.fstat(copies[0]).st_ino == chosen[0].inode
        finally:
            for fd in copies:
                os.close(fd)
        gone = [chosen[0], ProcSocket(closed, chosen[1].inode, chosen[1].tuple, TCP_ESTABLISHED)]
        before = set(os.listdir("/proc/self/fd"))
        assert take._taken_if_same(os.getpid(), pidfd, gone, {}) is None
        assert set(os.listdir("/proc/self/fd")) <= before


def test_an_interrupt_inside_getfds_leaves_no_copy_open(chosen: list[ProcSocket],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between two pidfd_getfd calls: the copies taken so far are closed, not left to hold the program's
    sockets open after its exit."""
    from sockrepair.move import pidfd as pidfd_module

    real = pidfd_module.lib
    calls = []

    class Interrupted:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def syscall(self, *args: object) -> object:
            calls.append(args)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real.syscall(*args)

    with pidfd_module.PidFd(os.getpid()) as pidfd:
        monkeypatch.setattr(pidfd_module, "lib", Interrupted())
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(KeyboardInterrupt):
            pidfd.getfds([chosen[0].fd, chosen[1].fd, chosen[0].fd])
        assert len(calls) == 3
        assert set(os.listdir("/proc/self/fd")) == before


_HOLDER = """
import socket, sys
held = []
for line in sys.stdin:
    if line.startswith("socket"):
        held.append(socket.socket())
    elif line.startswith("file"):
        held.append(open("/dev/null"))
    print("done", flush=True)
"""


@pytest.fixture
def holder(chosen: list[ProcSocket]) -> Iterator[tuple[subprocess.Popen[str], list[ProcSocket]]]:
    """A process holding `chosen`'s sockets at the same fd numbers, which opens a socket or a file when told."""
    fds = [s.fd for s in chosen]
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, pass_fds=fds)
    try:
        yield proc, chosen
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            assert pipe is not None
            pipe.close()


def _tell(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(what + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "done\n"


def test_unchanged_fds_are_known_by_their_count(holder, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, chosen = holder
    _tell(proc, "ready")
    others = take._other_fds(proc.pid, chosen)
    assert not set(others) & {s.fd for s in chosen} and others

    def listed(pid: int, chosen: list[ProcSocket]) -> dict[int, str]:
        raise AssertionError("/proc/PID/fd listed again")

    monkeypatch.setattr(take, "_other_fds", listed)
    assert take._same_fds(proc.pid, chosen, others)


@pytest.mark.parametrize(("opened", "same"), [("file", True), ("socket", False)])
def test_a_new_fd_has_the_list_read_again_and_only_a_socket_differs(holder, opened: str, same: bool) -> None:
    proc, chosen = holder
    _tell(proc, "ready")
    others = take._other_fds(proc.pid, chosen)
    _tell(proc, opened)
    assert take._same_fds(proc.pid, chosen, others) is same
