"""Taking connections out of a running program that knows nothing of sockrepair: freeze it, take its sockets with
pidfd_getfd, lock them, checkpoint them; then let them go on there (`leave_running`), or silence them and end it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sockrepair.engine._checkpoint import checkpoint, discard, resume
from sockrepair.errors import SocketStateError
from sockrepair.image.directory import Entry, write_dir
from sockrepair.lock import Locker
from sockrepair.move.freeze import frozen
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import (
    ProcessError,
    ProcSocket,
    process_name,
    socket_inodes,
    tcp_sockets,
)
from sockrepair.netns import inside
from sockrepair.state import TCP_ESTABLISHED, ConnectionState


class After(Enum):
    LEAVE_RUNNING = "leave-running"
    KILL = "kill"


@dataclass
class Phases:
    """Wall-clock milliseconds per phase, in the order they ran."""

    ms: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000


@dataclass
class Captured:
    """Sockets taken from a process, still frozen (repair mode on) and locked."""

    pid: int
    sockets: list[ProcSocket]
    fds: list[int]
    states: list[ConnectionState]
    freeze_method: str
    pidfd: PidFd
    frozen_at: float  # time.perf_counter() when the freeze began: downtime counts from here


def select_sockets(pid: int, wanted: Sequence[int] | None) -> list[ProcSocket]:
    found = tcp_sockets(pid)
    if wanted:
        by_fd = {s.fd: s for s in found}
        chosen = []
        for fd in wanted:
            if fd not in by_fd:
                raise ProcessError(f"fd {fd} of process {pid} is not a TCP socket (or not open)")
            if by_fd[fd].tcp_state != TCP_ESTABLISHED:
                raise SocketStateError(
                    f"fd {fd} of process {pid} ({by_fd[fd].tuple}) is {by_fd[fd].state_name}, not ESTABLISHED"
                )
            chosen.append(by_fd[fd])
        return chosen
    chosen = [s for s in found if s.tcp_state == TCP_ESTABLISHED]
    if not chosen:
        raise ProcessError(f"process {pid} ({process_name(pid)}) holds no established TCP connection")
    return chosen


def process_locker(pid: int) -> Locker:
    """A lock socket in the process's own network namespace, where its connections' packets flow."""
    with inside(f"/proc/{pid}/ns/net"):
        return Locker()


@contextlib.contextmanager
def captured(pid: int, wanted: Sequence[int] | None, locker: Locker | None, phases: Phases,
             ttl: float = 60.0) -> Iterator[Captured]:
    """Freeze `pid`, take and checkpoint its connections, and yield them frozen and locked. On an error every socket
    is resumed, the lock released and the process thawed; on success the caller decides (resume or discard)."""
    with PidFd(pid) as pidfd:
        # /proc/PID/net/tcp is read before the freeze (reading it costs ms with many connections); under the freeze
        # only the fd -> inode map is checked, and the table read again if the process changed its sockets meanwhile
        chosen = select_sockets(pid, wanted)
        frozen_at = time.perf_counter()
        with phases.timed("freeze"), contextlib.ExitStack() as freezing:
            method = freezing.enter_context(frozen(pid))
            thaw = freezing.pop_all()
        with thaw:
            inodes = socket_inodes(pid)
            if any(inodes.get(s.fd) != s.inode for s in chosen):
                chosen = select_sockets(pid, wanted)
            fds: list[int] = []
            states: list[ConnectionState] = []
            try:
                for s in chosen:
                    fds.append(pidfd.getfd(s.fd))
                if locker is not None:
                    with phases.timed("lock"):
                        locker.lock([s.tuple for s in chosen], ttl=ttl)
                with phases.timed("checkpoint"):
                    for fd in fds:
                        states.append(checkpoint(fd))
                yield Captured(pid, chosen, fds, states, method, pidfd, frozen_at)
            except BaseException:
                for fd in fds[: len(states)]:
                    with contextlib.suppress(OSError):
                        resume(fd)
                if locker is not None:
                    locker.unlock([s.tuple for s in chosen])
                raise
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def _kill_frozen(pidfd: PidFd, timeout: float = 5.0) -> None:
    """SIGKILL reaches a stopped or frozen process; its copies of the sockets close while still in repair mode.
    Waits for the exit (the pidfd turns readable once the files are closed), so that a restore on this host does
    not collide with the dying process's 4-tuples."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pidfd.pid, signal.SIGKILL)
    poller = select.poll()
    poller.register(pidfd.fd, select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise ProcessError(f"process {pidfd.pid} did not exit within {timeout:.0f} s of SIGKILL")


@dataclass
class DumpReport:
    pid: int
    command: str
    directory: str
    after: str
    freeze_method: str
    connections: list[dict[str, Any]]
    phases_ms: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def dump(pid: int, directory: Path, wanted: Sequence[int] | None = None, after: After = After.KILL,
         lock: bool = True, ttl: float = 60.0) -> DumpReport:
    """Write one image per connection of `pid` into `directory`. With After.KILL the connections stay locked (for
    `ttl` seconds) until a restore unlocks them; with LEAVE_RUNNING they go on in the process and are unlocked."""
    command = process_name(pid)
    phases = Phases()
    locker = process_locker(pid) if lock else None
    try:
        with captured(pid, wanted, locker, phases, ttl) as cap:
            with phases.timed("write"):
                entries = write_dir(directory, list(zip([s.fd for s in cap.sockets], cap.states)),
                                    {"pid": pid, "command": command, "host": socket.gethostname()})
            if after is After.LEAVE_RUNNING:
                with phases.timed("resume"):
                    for fd in cap.fds:
                        resume(fd)
                    if locker is not None:
                        locker.unlock([s.tuple for s in cap.sockets])
            else:
                with phases.timed("kill"):
                    for fd, state in zip(cap.fds, cap.states):
                        discard(fd, state)
                    cap.fds.clear()
                    _kill_frozen(cap.pidfd)
    finally:
        if locker is not None:
            locker.close()
    return DumpReport(pid, command, str(directory), after.value, cap.freeze_method,
                      [_entry_view(e, s) for e, s in zip(entries, cap.states)], phases.ms)


def _entry_view(entry: Entry, state: ConnectionState) -> dict[str, Any]:
    return {**entry.to_dict(), "recv_queue": len(state.recv_queue), "send_queue": len(state.send_queue),
            "unsent": state.unsent_len}


def inspect(pid: int) -> list[tuple[ProcSocket, ConnectionState | None, str]]:
    """A non-destructive look at every TCP socket of `pid`: established ones are checkpointed and resumed without a
    window probe while the process is frozen for the few microseconds that takes; others are listed as they are."""
    result: list[tuple[ProcSocket, ConnectionState | None, str]] = []
    if not any(s.tcp_state == TCP_ESTABLISHED for s in tcp_sockets(pid)):
        return [(s, None, s.state_name) for s in tcp_sockets(pid)]
    with PidFd(pid) as pidfd, frozen(pid):
        for s in tcp_sockets(pid):
            if s.tcp_state != TCP_ESTABLISHED:
                result.append((s, None, s.state_name))
                continue
            fd = pidfd.getfd(s.fd)
            try:
                state = checkpoint(fd)
                resume(fd)
                result.append((s, state, "ESTABLISHED"))
            finally:
                os.close(fd)
    return result
