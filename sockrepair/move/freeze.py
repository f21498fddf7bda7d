"""Freezing a process while its sockets are read, from a guard process that undoes what sockrepair leaves half-done
if sockrepair itself is killed.

The stop: the cgroup v2 freezer when the process has a cgroup of its own; else ptrace (PTRACE_SEIZE and
PTRACE_INTERRUPT on every thread: the kernel lets the process go when its tracer dies, kernel/ptrace.c
exit_ptrace()); else, when the process is already traced, SIGSTOP.

The guard is a child forked before the freeze (Freezer); it does the stopping and continuing on request, and waits
on a pipe from sockrepair. When that pipe closes before sockrepair said goodbye (sockrepair was SIGKILLed, or died
some other way), the guard finishes the job for it: before the point of no return it takes every socket sockrepair
said it works on (pidfd_getfd), turns repair mode off without a window probe, releases their lock, and lets the
process go on; past it (sockrepair had begun ending the source) it SIGKILLs the process, whose states are in the
move's journal, and leaves the lock for the restore. It ignores SIGINT, SIGTERM and SIGHUP, which a terminal sends to
the whole process group. What it cannot give back: an application's SO_REUSEADDR on a socket it resumed (leaving
repair mode clears it; sockrepair's own resume puts it back).

A process is never frozen when it is sockrepair itself or one of its ancestors (a shell running `sockrepair dump
--pid $$` would stop for good)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sockrepair.engine._ffi import ffi, lib
from sockrepair.errors import ProcessError
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import cgroup, stat, thread_stats

CGROUP_ROOT = Path("/sys/fs/cgroup")
FREEZE_TIMEOUT = 5.0
_WALL = 0x40000000  # waitpid(2) __WALL: wait for threads (clones) too
_PTRACE_EVENT_STOP = 128


def freezer_for(pid: int) -> Path | None:
    """The cgroup directory to freeze, or None when freezing it would also freeze this process (or everything)."""
    group = cgroup(pid)
    if not group or group == "/" or group == cgroup(os.getpid()):
        return None
    path = CGROUP_ROOT / group.lstrip("/")
    return path if (path / "cgroup.freeze").exists() else None


def refuse_self(pid: int) -> None:
    """Raise ProcessError when `pid` is this process or one of its ancestors: freezing it would stop sockrepair."""
    me = os.getpid()
    current: int | None = me
    while current is not None and current > 0:
        if current == pid:
            who = "sockrepair itself" if pid == me else f"an ancestor of sockrepair (pid {me})"
            raise ProcessError(f"process {pid} is {who}: freezing it would stop sockrepair too; run sockrepair from "
                               "outside the program to move", pid=pid)
        st = stat(current)
        current = st.ppid if st is not None else None


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


def _ptrace(request: int, tid: int, data: int = 0) -> int:
    return int(lib.ptrace(ffi.cast("int", request), ffi.cast("int", tid), ffi.cast("void *", 0),
                          ffi.cast("void *", data)))


class _Stop:
    """One stop of process `pid` inside the guard: start() stops it, end() lets it go."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.method = ""
        self.group: Path | None = None
        self.traced: dict[int, int] = {}  # tid -> signal to deliver again when detaching

    def start(self) -> str:
        self.group = freezer_for(self.pid)
        if self.group is not None:
            (self.group / "cgroup.freeze").write_text("1")
            group = self.group
            self.method = "cgroup"
            _wait(self.pid, lambda: "frozen 1" in (group / "cgroup.events").read_text(), f"freezing cgroup {group}")
        elif self._seize():
            self.method = "ptrace"
        else:
            try:
                os.kill(self.pid, signal.SIGSTOP)
            except ProcessLookupError:
                raise ProcessError(f"no such process: {self.pid}", pid=self.pid) from None
            except PermissionError:
                raise ProcessError(f"not permitted to stop process {self.pid} (run as root)", pid=self.pid) from None
            self.method = "sigstop"
            _wait(self.pid, lambda: _all_threads_stopped(self.pid),
                  f"stopping process {self.pid}" + (" (the init of a pid namespace ignores SIGSTOP)"
                                                     if self.pid == 1 else ""))
        return self.method

    def _seize(self) -> bool:
        """Stop every thread with ptrace; False (nothing held) when the process cannot be traced (already traced,
        or not permitted): SIGSTOP then."""
        seized: list[int] = []
        while True:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
            except FileNotFoundError:
                self._detach(seized)
                raise ProcessError(f"no such process: {self.pid}", pid=self.pid) from None
            new = [t for t in tids if t not in seized]
            if not new:
                break
            for tid in new:  # a stopped thread clones nothing: the loop ends once every thread was seized
                if _ptrace(lib.PTRACE_SEIZE, tid) < 0:
                    err = ffi.errno
                    if err == errno.ESRCH:  # the thread ended meanwhile
                        continue
                    self._detach(seized)
                    return False
                seized.append(tid)
                _ptrace(lib.PTRACE_INTERRUPT, tid)
        for tid in seized:
            try:
                _, status = os.waitpid(tid, _WALL)
            except ChildProcessError:
                continue
            if not os.WIFSTOPPED(status):  # the thread exited
                continue
            event = status >> 16
            # a signal that arrived first stops the thread as well; it is delivered again when the thread is let go
            self.traced[tid] = os.WSTOPSIG(status) if event == 0 and os.WSTOPSIG(status) != signal.SIGTRAP else 0
            if event not in (0, _PTRACE_EVENT_STOP):
                self.traced[tid] = 0
        if not self.traced:
            raise ProcessError(f"process {self.pid} exited while being frozen", pid=self.pid)
        return True

    @staticmethod
    def _detach(tids: Sequence[int], signals: dict[int, int] | None = None) -> None:
        for tid in tids:
            _ptrace(lib.PTRACE_DETACH, tid, (signals or {}).get(tid, 0))

    def end(self) -> None:
        if self.method == "cgroup" and self.group is not None:
            (self.group / "cgroup.freeze").write_text("0")
        elif self.method == "ptrace":
            self._detach(list(self.traced), self.traced)
            self.traced = {}
        elif self.method == "sigstop":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
        self.method = ""


def _guard(pid: int, pidfd: int, commands: int, replies: int) -> None:
    """The guard's loop (see the module's docstring); runs in the forked child, never returns."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    stop = _Stop(pid)
    watched: dict[str, Any] = {"fds": [], "tuples": [], "ended": False}
    # resolved now, not inside the first freeze (cffi looks a libc symbol up on its first use)
    _ = lib.ptrace, lib.syscall
    status = 0
    try:
        with os.fdopen(commands, "rb") as inbox, os.fdopen(replies, "wb", buffering=0) as outbox:
            for line in inbox:
                msg = json.loads(line)
                op = msg["op"]
                if op == "watch":
                    watched.update(fds=msg["fds"], tuples=msg["tuples"])
                    continue
                if op == "ending":
                    watched["ended"] = True
                    continue
                if op == "close":
                    return
                reply: dict[str, Any] = {"ok": True}
                try:
                    if op == "ping":
                        freezer_for(pid)
                    elif op == "stop":
                        reply["method"] = stop.start()
                    elif op == "cont":
                        stop.end()
                except ProcessError as exc:
                    reply = {"ok": False, "error": str(exc)}
                outbox.write(json.dumps(reply).encode() + b"\n")
        # the pipe closed without "close": sockrepair is gone
        _recover(pid, pidfd, stop, watched)
    except BaseException:
        status = 1
    finally:
        with contextlib.suppress(BaseException):
            stop.end()
        os._exit(status)


def _recover(pid: int, pidfd: int, stop: _Stop, watched: dict[str, Any]) -> None:
    """What sockrepair would have done on an error, done for it after it died."""
    if watched["ended"]:
        os.kill(pid, signal.SIGKILL)  # its states are in the journal; the lock holds them for the restore
        return
    from sockrepair.engine._repair import in_repair, repair_off
    from sockrepair.move.take import process_locker
    from sockrepair.state import ConnTuple

    for target in watched["fds"]:
        fd = lib.syscall(lib.SYS_pidfd_getfd, ffi.cast("int", pidfd), ffi.cast("int", target),
                         ffi.cast("unsigned int", 0))
        if fd < 0:
            continue
        try:
            if in_repair(fd):
                repair_off(fd, False)
        except OSError:
            pass
        finally:
            os.close(fd)
    if watched["tuples"]:
        with process_locker(pid) as locker:
            locker.unlock([ConnTuple.parse(t) for t in watched["tuples"]])


class Freezer:
    """Stops and continues process `pid` through a guard child (see the module's docstring). Use as a context
    manager; frozen() for one stop. Raises ProcessError when `pid` is sockrepair or one of its ancestors, or does
    not exist, or the guard is gone."""

    def __init__(self, pid: int, pidfd: int) -> None:
        refuse_self(pid)
        self.pid = pid
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        child = os.fork()
        if child == 0:
            keep = {cmd_r, rep_w, pidfd}
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd > 2 and fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            _guard(pid, pidfd, cmd_r, rep_w)
        os.close(cmd_r)
        os.close(rep_w)
        self.child = child
        self._out = os.fdopen(cmd_w, "wb", buffering=0)
        self._in = os.fdopen(rep_r, "rb")
        # a first round trip before any freeze: the child's start-up (pages copied on write) costs milliseconds
        try:
            self._ask("ping")
        except BaseException:
            self.close()
            raise

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._out.write(json.dumps(msg).encode() + b"\n")
        except BrokenPipeError:
            raise ProcessError(f"the guard of process {self.pid} exited", pid=self.pid) from None

    def _ask(self, op: str) -> dict[str, Any]:
        self._send({"op": op})
        line = self._in.readline()
        if not line:
            raise ProcessError(f"the guard of process {self.pid} exited", pid=self.pid)
        reply: dict[str, Any] = json.loads(line)
        if not reply["ok"]:
            raise ProcessError(reply["error"], pid=self.pid)
        return reply

    def watch(self, fds: Sequence[int], tuples: Sequence[object]) -> None:
        """The process's fds (its own numbers) sockrepair may put in repair mode and the tuples it may lock: what
        the guard gives back if sockrepair dies before ending()."""
        self._send({"op": "watch", "fds": list(fds), "tuples": [str(t) for t in tuples]})

    def ending(self) -> None:
        """Past the point of no return: if sockrepair dies from now on, the guard ends the process."""
        self._send({"op": "ending"})

    @contextlib.contextmanager
    def frozen(self) -> Iterator[str]:
        """Yields the method used ("cgroup", "ptrace" or "sigstop"); the process goes on on every way out."""
        method = str(self._ask("stop")["method"])
        try:
            yield method
        finally:
            self._ask("cont")

    def close(self) -> None:
        if self.child <= 0:
            return
        with contextlib.suppress(OSError):
            self._send({"op": "close"})
        self._out.close()
        self._in.close()
        os.waitpid(self.child, 0)
        self.child = 0

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[str]:
    """One stop of `pid` through its own guard: yields the method used ("cgroup", "ptrace" or "sigstop"). Raises
    ProcessError (gone, not permitted, sockrepair or an ancestor of it, or not stopped within FREEZE_TIMEOUT
    seconds)."""
    with PidFd(pid) as pidfd, Freezer(pid, pidfd.fd) as freezer, freezer.frozen() as method:
        yield method
