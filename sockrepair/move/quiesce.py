"""Whether a stopped program is between requests, so that moving its sockets loses nothing it already read.

Once a program has read a request from a socket, the kernel's queue no longer holds it: if the program is frozen
before it answered, moving the socket (and ending the program) loses the request, and the peer waits for an answer
that never comes. The kernel shows, for each stopped thread, the system call it was blocked in
(/proc/PID/task/TID/syscall, proc(5): the call's number, or -1 when the thread was running its own code). A program
whose every thread waits for input or for time (poll, epoll_wait, select, accept, recv, read, futex, nanosleep...)
holds no half-handled request, as far as the kernel can tell; a program that keeps a request in memory while it waits
on something else (a backend, a lock, a timer) looks the same. Only criu moves a program's memory with its sockets.

A busy program is thawed and frozen again, with growing pauses, until it is caught waiting or the time allowed runs
out; the caller's policy then decides: refuse (the program goes on, nothing moved) or move anyway (reported)."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from enum import Enum

from sockrepair.errors import ProcessError, refused_advice
from sockrepair.move.freeze import Freezer

# System call numbers from the kernel UAPI (arch/x86/entry/syscalls/syscall_64.tbl; include/uapi/asm-generic/unistd.h
# for arm64): the calls in which a thread waits for input, for a child, for a signal or for time.
_WAITING_X86_64 = {
    0: "read", 7: "poll", 23: "select", 34: "pause", 35: "nanosleep", 43: "accept", 45: "recvfrom", 47: "recvmsg",
    61: "wait4", 128: "rt_sigtimedwait", 130: "rt_sigsuspend", 202: "futex", 208: "io_getevents", 230:
    "clock_nanosleep", 232: "epoll_wait", 247: "waitid", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 288:
    "accept4", 299: "recvmmsg", 426: "io_uring_enter", 441: "epoll_pwait2", 449: "futex_waitv",
}  # fmt: skip
_WAITING_GENERIC = {
    4: "io_getevents", 22: "epoll_pwait", 63: "read", 72: "pselect6", 73: "ppoll", 95: "waitid", 98: "futex",
    101: "nanosleep", 115: "clock_nanosleep", 133: "rt_sigsuspend", 137: "rt_sigtimedwait", 202: "accept",
    207: "recvfrom", 212: "recvmsg", 242: "accept4", 243: "recvmmsg", 260: "wait4", 426: "io_uring_enter",
    441: "epoll_pwait2", 449: "futex_waitv",
}  # fmt: skip
WAITING_CALLS: dict[str, dict[int, str]] = {"x86_64": _WAITING_X86_64, "aarch64": _WAITING_GENERIC,
                                            "riscv64": _WAITING_GENERIC}

DEFAULT_TIMEOUT = 2.0
_FIRST_PAUSE = 0.0005
_LONGEST_PAUSE = 0.05


class OnBusy(Enum):
    """What to do with a program still busy when the time allowed for catching it waiting has run out."""

    REFUSE = "refuse"  # thaw it and raise ProcessError: nothing moved, the program goes on
    MOVE = "move"  # move it anyway; the report says it was not quiescent


@dataclass(frozen=True)
class Quiescence:
    """The policy: try for `timeout` seconds to freeze the program while every thread waits, then `on_busy`."""

    timeout: float = DEFAULT_TIMEOUT
    on_busy: OnBusy = OnBusy.REFUSE

    def __post_init__(self) -> None:
        if not 0 <= self.timeout <= 600:
            raise ValueError(f"quiescence timeout {self.timeout} s is outside 0..600 s")


@dataclass(frozen=True)
class BusyThread:
    """A stopped thread that was not waiting: `call` is the system call it was in, or None when it was running its
    own code."""

    tid: int
    call: str | None

    def __str__(self) -> str:
        return f"thread {self.tid} {'in ' + self.call if self.call else 'running its own code'}"


@dataclass
class Freeze:
    """How the program was frozen: `method` ("cgroup", "ptrace" or "sigstop"), `frozen_at` (time.perf_counter() when the last,
    kept, freeze began: downtime counts from here), `attempts` (freezes tried), `quiescent`, and the threads that
    were busy at the last look (empty when quiescent)."""

    method: str
    frozen_at: float
    attempts: int
    quiescent: bool
    busy: list[BusyThread] = field(default_factory=list)


def _waiting_calls() -> dict[int, str]:
    calls = WAITING_CALLS.get(platform.machine())
    if calls is None:
        raise ProcessError(f"no table of waiting system calls for {platform.machine()}: cannot tell whether the "
                           "program is between requests (move it with on_busy=move)")
    return calls


def busy_threads(pid: int, active: Collection[int] = ()) -> list[BusyThread]:
    """The threads of the STOPPED process `pid` that are not blocked in a waiting call ([] when quiescent); the
    threads in `active` are known (from their registers, sockrepair.move.freeze) to have been on their way back
    from a call that completed, or running, whatever /proc shows: a thread just back from a read() holds what it
    read. Raises ProcessError when the process is gone or its threads cannot be read."""
    waiting = _waiting_calls()
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise ProcessError(f"process {pid} exited", pid=pid) from None
    busy = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                first = f.read().split(maxsplit=1)[0]
        except FileNotFoundError:  # the thread ended before the freeze took hold
            continue
        except PermissionError:
            raise ProcessError(f"cannot read the system calls of process {pid} (needs ptrace access: "
                               f"{refused_advice('run as root')})", pid=pid) from None
        if first == "running":  # not stopped after all: never counted as waiting
            busy.append(BusyThread(tid, "running"))
            continue
        number = int(first)
        if number not in waiting:
            busy.append(BusyThread(tid, None if number < 0 else f"system call {number}"))
        elif tid in active:
            busy.append(BusyThread(tid, f"{waiting[number]} (just returned)"))
    return busy


@contextlib.contextmanager
def quiescent_freeze(pid: int, policy: Quiescence = Quiescence(), freezer: Freezer | None = None) -> Iterator[Freeze]:
    """Freeze `pid` at a point where every thread waits (see the module's docstring), within `policy.timeout`, and
    yield how it went; the program is thawed on every way out. `freezer`: the guard to freeze through (one of its
    own when None; sockrepair.move.freeze). Raises ProcessError when the program stayed busy and the policy refuses
    (the program was thawed, nothing was taken), or as Freezer does."""
    with contextlib.ExitStack() as own:
        guard = freezer if freezer is not None else own.enter_context(Freezer(pid))
        deadline = time.monotonic() + policy.timeout
        pause = _FIRST_PAUSE
        attempts = 0
        while True:
            attempts += 1
            frozen_at = time.perf_counter()
            with contextlib.ExitStack() as stack:
                method = stack.enter_context(guard.frozen())
                busy = busy_threads(pid, guard.active)
                if not busy or time.monotonic() >= deadline:
                    if busy and policy.on_busy is OnBusy.REFUSE:
                        raise ProcessError(
                            f"process {pid} stayed busy for {policy.timeout:g} s ({attempts} tries; "
                            f"{', '.join(map(str, busy))}): moving it now could lose a request it has read and not "
                            "answered; nothing was moved. Try again, allow longer, or move anyway (--busy move)",
                            pid=pid)
                    thaw = stack.pop_all()
                    break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _LONGEST_PAUSE)
        with thaw:
            yield Freeze(method, frozen_at, attempts, not busy, busy)
