"""Freezing a process while its sockets are read, from a guard process that undoes what sockrepair leaves half-done
if sockrepair itself is killed.

The stop: the cgroup v2 freezer when the process is alone in a cgroup of its own; else ptrace (PTRACE_SEIZE and
PTRACE_INTERRUPT on every thread: the kernel lets the process go when its tracer dies, kernel/ptrace.c
exit_ptrace()); else, when the process is already traced, SIGSTOP.

The guard is a child forked before the freeze (Freezer); it does the stopping and continuing on request, and waits on a
socket pair from sockrepair. When that closes before sockrepair said goodbye (sockrepair was SIGKILLed, or died some
other way), the guard finishes the job for it: before the point of no return it takes every socket sockrepair said it
works on (pidfd_getfd), turns repair mode off without a window probe, releases their lock, and lets the process go on;
past it (sockrepair had begun ending the source) it SIGKILLs the process, whose states are in the move's journal, and
leaves the lock for the restore. migrate() keeps the guard until the handoff and gives it duplicates of the restored
sockets meanwhile (hold(), release()): if sockrepair dies holding them, the guard locks them again, checkpoints them
into the journal and closes them silently; it holds duplicates of the connections accepted from the process's listeners
while they are locked and not yet saved (guard_accepted()), and resets them if sockrepair dies then
(sockrepair.move.backlog.carry). The guard ignores SIGINT, SIGTERM, SIGHUP and SIGQUIT, which a terminal sends to the
whole process group (Ctrl-C, Ctrl-\\), and leaves sockrepair's group for one of its own, so that a SIGKILL of the group
(`kill -KILL -- -PGID`) does not reach it; a kill of the whole cgroup does. Leaving repair mode clears a socket's
SO_REUSEADDR: the guard sets it again on the sockets sockrepair said had it when checkpointed (reuse()).

A process is never frozen when it is sockrepair itself or one of its ancestors (a shell running `sockrepair dump
--pid $$` would stop for good)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from sockrepair.engine._ffi import ffi, lib
from sockrepair.errors import ProcessError, refused_advice
from sockrepair.move.pidfd import PidFd, shared_socket
from sockrepair.move.procfs import cgroup, fd_holders, stat, thread_stats

CGROUP_ROOT = Path("/sys/fs/cgroup")
FREEZE_TIMEOUT = 5.0
ANSWER_TIMEOUT = 3 * FREEZE_TIMEOUT  # seconds for the guard to answer or, once told to close, to exit
REAP_TIMEOUT = FREEZE_TIMEOUT  # seconds the guard waits for killed threads to exit: within ANSWER_TIMEOUT
_WALL = 0x40000000  # waitpid(2) __WALL: wait for threads (clones) too
_PTRACE_EVENT_STOP = 128


def freezer_for(pid: int) -> Path | None:
    """The cgroup v2 directory to freeze, or None when freezing it would freeze more than process `pid` (this
    process, another process of the group, a group below it) or there is no v2 freezer."""
    group = cgroup(pid)
    if not group or group == "/" or group == cgroup(os.getpid()):
        return None
    path = CGROUP_ROOT / group.lstrip("/")
    try:
        alone = (path / "cgroup.procs").read_text().split() == [str(pid)]
        leaf = not any(child.is_dir() for child in path.iterdir())
    except OSError:
        return None
    return path if alone and leaf and (path / "cgroup.freeze").exists() else None


def refuse_self(pid: int, why: str = "freezing it would stop sockrepair too") -> None:
    """Raise ProcessError when `pid` is this process or one of its ancestors: freezing it would stop sockrepair
    (`why` says what else doing it would do)."""
    me = os.getpid()
    current: int | None = me
    while current is not None and current > 0:
        if current == pid:
            who = "sockrepair itself" if pid == me else f"an ancestor of sockrepair (pid {me})"
            raise ProcessError(f"process {pid} is {who}: {why}; run sockrepair from outside the program to move",
                               pid=pid)
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


# What a blocking call returns when a stop interrupts it (include/linux/errno.h): -ERESTARTSYS, -ERESTARTNOINTR,
# -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK, and -EINTR (epoll_wait and a few others, man 7 signal).
_INTERRUPTED = {-512, -513, -514, -516, -errno.EINTR}
_X86_64_RAX, _X86_64_ORIG_RAX = 10, 15  # struct user_regs_struct (arch/x86/include/asm/user_64.h)


def _blocked_in_call(tid: int) -> bool:
    """Whether the ptrace-stopped thread `tid` was blocked in a system call, which the stop interrupted (it will be
    restarted), rather than running its own code or on its way back from a call that completed: /proc's syscall
    file shows the call's number in both cases, and a thread just back from a read() with a request in hand is
    not between requests. True where the registers cannot be read here (not x86_64): /proc decides alone."""
    if platform.machine() != "x86_64":
        return True
    regs = ffi.new("unsigned long long[27]")
    if _ptrace(lib.PTRACE_GETREGS, tid, int(ffi.cast("uintptr_t", regs))) < 0:
        return True
    signed = ffi.cast("long long", regs[_X86_64_RAX])
    return int(ffi.cast("long long", regs[_X86_64_ORIG_RAX])) >= 0 and int(signed) in _INTERRUPTED


def _ptrace(request: int, tid: int, data: int = 0) -> int:
    return int(lib.ptrace(ffi.cast("int", request), ffi.cast("int", tid), ffi.cast("void *", 0),
                          ffi.cast("void *", data)))


def _collect(tids: Collection[int], timeout: float) -> set[int]:
    """Collect the exits of the traced threads `tids` (killed), as their tracer; returns those that had not exited
    after `timeout` seconds (a thread in uninterruptible sleep dies late). A stop reported meanwhile is passed over."""
    deadline = time.monotonic() + timeout
    pending = set(tids)
    # a killed thread exits within 0.1-1 ms, and the restore waits for it (wait_exited): polled every 1 ms, the reap
    # took 0.73-0.79 ms (medians of 10-12 moves of one connection), every 50 us (some 0.1 ms with the timer's slack)
    # 0.14-0.37 ms; after 2 ms, a thread slow to die is polled every 1 ms
    fast_until = time.monotonic() + 0.002
    while pending:
        for tid in list(pending):
            try:
                found, status = os.waitpid(tid, os.WNOHANG | _WALL)
            except ChildProcessError:
                pending.discard(tid)
                continue
            if found and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                pending.discard(tid)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.00005 if time.monotonic() < fast_until else 0.001)
    return pending


class _Stop:
    """One stop of process `pid` inside the guard: start() stops it, end() lets it go."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.method = ""
        self.group: Path | None = None
        self.traced: dict[int, int] = {}  # tid -> signal to deliver again when detaching
        # threads that were not blocked in a system call when stopped (ptrace only: the registers tell)
        self.active: set[int] = set()

    def start(self) -> str:
        self.active = set()
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
                raise ProcessError(f"not permitted to stop process {self.pid} ({refused_advice('run as root')})",
                                   pid=self.pid) from None
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
        deadline = time.monotonic() + FREEZE_TIMEOUT
        for tid in seized:
            try:
                while True:  # bounded: a thread in an uninterruptible wait may take its time to stop
                    found, status = os.waitpid(tid, _WALL | os.WNOHANG)
                    if found:
                        break
                    if time.monotonic() > deadline:
                        self._detach(seized)
                        raise ProcessError(f"thread {tid} of process {self.pid} did not stop within "
                                           f"{FREEZE_TIMEOUT:.0f} s", pid=self.pid)
                    time.sleep(0.0001)
            except ChildProcessError:
                continue
            if not os.WIFSTOPPED(status):  # the thread exited
                continue
            if not _blocked_in_call(tid):
                self.active.add(tid)
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
        # a thread killed while traced cannot be detached: collecting its exit hands the zombie back to its parent,
        # which could not reap it otherwise until this guard exits (kernel/exit.c); it may not have exited yet
        killed = [tid for tid in tids if _ptrace(lib.PTRACE_DETACH, tid, (signals or {}).get(tid, 0)) < 0]
        if killed:
            _collect(killed, REAP_TIMEOUT)

    def reap(self, timeout: float) -> None:
        """Once the process was SIGKILLed under ptrace: collect the exit of every thread this guard traces. Only the
        tracer can; until it does, the killed thread group stays unreaped and its pidfd never turns readable
        (kernel/exit.c), so that a mover waiting for the exit waited until this guard itself exited."""
        if self.method == "ptrace":
            pending = _collect(self.traced, timeout)
            self.traced = {tid: sig for tid, sig in self.traced.items() if tid in pending}

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


_CHUNK = 1000  # tuples per "watch" message: a datagram must fit the socket's buffer
SCM_MAX_FD = 253  # fds per message (include/net/scm.h)
_HOLD = b"h"  # the message carrying one restored socket (not JSON: one per socket, inside the downtime)
_HOLD_BUFFERS = [_HOLD]
_FD = struct.Struct("i")  # one fd of SCM_RIGHTS' array of ints, in native order
# bytes the holds may queue unread (SO_SNDBUFFORCE; a message of one fd takes about 768): the guard reads them only
# when it needs them, and 1,000 sockets of a move fit
_HOLD_BUFFER = 8 << 20
_SO_SNDBUFFORCE = 32  # asm-generic/socket.h


_GUARD_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _guard(pid: int, pidfd: int, chan: socket.socket, holds: socket.socket, mask: set[int | signal.Signals]) -> None:
    """The guard's loop (see the module's docstring); runs in the forked child, never returns. `holds`: where
    hold_one() queues the restored sockets, read only when they are needed (take_holds()). `mask`: the signal mask
    to restore once the signals a terminal sends the whole group are ignored."""
    for sig in _GUARD_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    stop = _Stop(pid)
    watched: dict[str, Any] = {"fds": [], "tuples": [], "ended": False, "reuse": set(), "accepted": [],
                               "accepted_index": ""}
    landing = _Landing(holds)
    # resolved now, not inside the first freeze (cffi looks a libc symbol up on its first use)
    _ = lib.ptrace, lib.syscall
    status = 0
    try:
        if not _serve(pid, chan, stop, watched, landing):  # sockrepair is gone without saying goodbye
            if watched["accepted"]:
                _end_accepted(watched["accepted"], watched["accepted_index"])
            landing.take_holds()  # queued in the kernel: sockrepair's death closed none of them
            if landing.socks:
                landing.save(pid)
            else:
                _recover(pid, pidfd, stop, watched)
    except BaseException:
        status = 1
    finally:
        with contextlib.suppress(BaseException):
            stop.end()
        os._exit(status)


def _end_accepted(held: list[tuple[socket.socket, str]], index: str) -> None:
    """sockrepair died carrying the connections accepted from the process's listeners: those the index lists
    are saved (in repair mode: closed silently, for their restore); the others are reset, past their lock."""
    from sockrepair.move.backlog import Backlog, reset

    try:
        listed = {c["tuple"] for c in json.loads(Path(index).read_bytes())["connections"]}
    except (OSError, ValueError, KeyError, TypeError):  # not written yet
        listed = set()
    for sock, conn in held:
        if conn in listed:
            sock.close()
    reset(Backlog([sock for sock, conn in held if conn not in listed]))


def _serve(pid: int, chan: socket.socket, stop: _Stop, watched: dict[str, Any], landing: _Landing) -> bool:
    """Answer sockrepair's requests until it says "close" (True) or is gone (False). Everything it sent before it
    died is read first: a message still queued may say that it began ending the source."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(chan, 1 << 20, SCM_MAX_FD)
        except ConnectionResetError:
            # it died with a reply of ours unread; the kernel reports that before the messages still queued
            continue
        if not data:
            return False
        msg = json.loads(data)
        op = msg["op"]
        if op == "watch":
            watched.update(fds=msg["fds"], tuples=msg["tuples"])
        elif op == "watch+":
            watched["fds"] += msg["fds"]
            watched["tuples"] += msg["tuples"]
        elif op == "reuse":
            watched["reuse"] = set(msg["fds"])
        elif op == "ending":
            watched["ended"] = True
        elif op == "land":
            landing.expect(msg["where"], watched)
        elif op == "accepted":
            watched["accepted"] += zip([shared_socket(fd) for fd in fds], msg["tuples"], strict=True)
            watched["accepted_index"] = msg["index"]
        elif op == "accepted-done":
            for sock, _ in watched["accepted"]:
                sock.close()
            watched["accepted"] = []
        elif op == "handing":
            landing.handing = True
        elif op == "close":
            return True
        else:
            reply: dict[str, Any] = {"ok": True}
            try:
                if op == "ping":
                    freezer_for(pid)
                elif op == "stop":
                    reply["method"] = stop.start()
                    reply["active"] = sorted(stop.active)
                elif op == "cont":
                    stop.end()
                elif op == "reap":
                    stop.reap(REAP_TIMEOUT)
                elif op == "take":
                    landing.take_holds()
                elif op == "release":
                    landing.release()
            except ProcessError as exc:
                reply = {"ok": False, "error": str(exc)}
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # gone: the next read says so
                chan.send(json.dumps(reply).encode())


class _Landing:
    """Inside the guard: duplicates of the sockets a move restored, held until they are handed off, so that a
    sockrepair killed meanwhile does not close them (a FIN, or a socket left holding the 4-tuple) but the guard saves
    them into the journal, as migrate() does on an error there."""

    def __init__(self, holds: socket.socket) -> None:
        self.holds = holds
        holds.setblocking(False)  # read only what is queued (recv_fds() does not pass its flags on)
        self.socks: list[socket.socket] = []
        self.tuples: list[str] = []
        self.source_fds: list[int] = []
        self.where: dict[str, Any] = {}
        self.handing = False  # the handoff began: some sockets may be in the new program already

    def expect(self, where: dict[str, Any], watched: dict[str, Any]) -> None:
        self.tuples = list(watched["tuples"])
        self.source_fds = list(watched["fds"])
        self.where = where

    def take_holds(self) -> None:
        """Take every restored socket hold_one() queued so far (none after release()), in the order they were
        sent."""
        while self.holds.fileno() >= 0:
            try:
                _, fds, _, _ = socket.recv_fds(self.holds, len(_HOLD), SCM_MAX_FD)
            except BlockingIOError:
                return
            if not fds:  # sockrepair's end is closed and nothing is queued
                return
            self.socks += [shared_socket(fd) for fd in fds]

    def release(self) -> None:
        """Close the sockets taken, and the holds channel with those still queued (the kernel drops them at once:
        reading a thousand of them here would take the CPU the program that took the connections needs now)."""
        for sock in self.socks:
            sock.close()
        self.socks = []
        self.holds.close()

    def save(self, pid: int) -> None:
        """Lock the connections again, checkpoint the held sockets into the journal, close them silently. When
        sockrepair died during the handoff, the sockets some other process holds now were handed off: those are
        left to it, and only the others saved. When the move was marked completed (journal.completed) they are only
        closed: without a handoff they were the dead caller's."""
        from sockrepair.engine import checkpoint, discard
        from sockrepair.image import encode
        from sockrepair.lock import Locker
        from sockrepair.move.journal import completed, load_states, write_journal
        from sockrepair.netns import named
        from sockrepair.state import ConnTuple

        if self.handing:
            mine = close_passed(self.socks)
            self.socks = [self.socks[i] for i in mine]
            self.tuples = [self.tuples[i] for i in mine]
            self.source_fds = [self.source_fds[i] for i in mine]
            if not self.socks:  # every one handed off: the move is done
                from sockrepair.move.journal import mark_completed

                if Path(self.where["directory"]).is_dir():  # gone: migrate() removed it, done
                    mark_completed(Path(self.where["directory"]), created=False)
                return
        netns, ttl = self.where["netns"], float(self.where["ttl"])
        directory = Path(self.where["directory"])
        if completed(directory):
            # no handoff: migrate() gave the sockets to its caller, and they die with it. Locked again into a journal
            # that no restore would use, their peers would hear nothing until the lock's TTL; closed, they are told.
            self.release()
            return
        # the journal as written before the source was ended, its held connections replaced by what they are now
        # (a socket restored but not held yet, when sockrepair died mid-restore, is beyond saving); read before the
        # lock, so that a journal that cannot be read leaves the peers told of the close, not locked out
        images = {st.tuple: encode(st) for st in load_states(directory)}
        held = [ConnTuple.parse(t) for t in self.tuples[: len(self.socks)]]
        with named(netns), Locker() as locker:
            locker.lock(held, ttl=ttl)
        for conn, sock in zip(held, self.socks):
            images[conn] = encode(checkpoint(sock))
        order = [ConnTuple.parse(t) for t in self.tuples]
        write_journal(directory, pid, self.source_fds, [images[c] for c in order], order, ttl=ttl, netns=netns)
        for sock in self.socks:
            discard(sock)
        self.socks = []


HANDOFF_GRACE = 0.5  # seconds for sockets in flight over SCM_RIGHTS to reach the program they were sent to


def close_passed(socks: Sequence[socket.socket]) -> list[int]:
    """After a handoff that may have passed some of `socks` before it failed: close this process's copies of those
    another process holds (held_elsewhere: the program's now, left as they are) and return the indices of the
    others, still this process's to end."""
    inodes = [os.fstat(sock.fileno()).st_ino for sock in socks]
    elsewhere = held_elsewhere(inodes)
    for sock, inode in zip(socks, inodes, strict=True):
        if inode in elsewhere:
            sock.close()
    return [i for i, inode in enumerate(inodes) if inode not in elsewhere]


def held_elsewhere(inodes: Sequence[int], exclude: Collection[int] = ()) -> set[int]:
    """The socket inodes among `inodes` that a process other than this one (and the pids in `exclude`) has open,
    looked for in /proc/*/fd until all are found or HANDOFF_GRACE seconds have passed."""
    deadline = time.monotonic() + HANDOFF_GRACE
    skip = {os.getpid(), *exclude}
    while True:
        found = set(fd_holders(inodes, skip))
        if len(found) == len(set(inodes)) or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _recover(pid: int, pidfd: int, stop: _Stop, watched: dict[str, Any]) -> None:
    """What sockrepair would have done on an error, done for it after it died."""
    if watched["ended"]:
        os.kill(pid, signal.SIGKILL)  # its states are in the journal; the lock holds them for the restore
        return
    from sockrepair.engine._repair import in_repair, repair_off
    from sockrepair.engine._session import session_of
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
                if target in watched["reuse"]:  # leaving repair mode cleared it (net/ipv4/tcp.c: SK_NO_REUSE)
                    # not socket.socket(fileno=...): under the default timeout sockrepair's caller may have set
                    # (inherited by this fork), that constructor makes the program's own socket non-blocking
                    session_of(fd).set(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1, "SO_REUSEADDR")
        except OSError:
            pass
        finally:
            os.close(fd)
    if watched["tuples"]:
        with process_locker(pid) as locker:
            locker.unlock([ConnTuple.parse(t) for t in watched["tuples"]])


class Freezer:
    """Stops and continues process `pid` through a guard child (see the module's docstring); `.pidfd` is a PidFd on
    the process, which the guard shares. Use as a context manager; frozen() for one stop. Raises ProcessError when
    `pid` is sockrepair or one of its ancestors, or does not exist, or the guard is gone."""

    def __init__(self, pid: int, inherit: Sequence[int] = ()) -> None:
        """`inherit`: fds the guard keeps open until it exits (e.g. a flock on the journal directory)."""
        refuse_self(pid)
        self.pid = pid
        self.pidfd = PidFd(pid)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        holds, their_holds = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # SIGINT, SIGTERM and SIGHUP are held back over the fork: a handler run inside Python's at-fork hooks has
        # its exception printed and dropped there, and the move would go on; once the guard exists, they unwind
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _GUARD_IGNORES)
        child = os.fork()
        if child == 0:
            try:  # the child never returns into the caller's code
                # out of sockrepair's process group: a supervisor that kills the group (kill -KILL -- -PGID)
                # must not take the guard with the mover, whose half-done work it exists to undo
                os.setpgid(0, 0)
                keep = {theirs.fileno(), their_holds.fileno(), self.pidfd.fd, *inherit}
                for name in os.listdir("/proc/self/fd"):
                    fd = int(name)
                    if fd > 2 and fd not in keep:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                _guard(pid, self.pidfd.fd, theirs, their_holds, blocked)
            finally:
                os._exit(1)
        # and from this side as well, before anything else: the child may not have run yet when a group kill comes
        with contextlib.suppress(OSError):  # ESRCH: gone already; EACCES: it exec'd (it never does)
            os.setpgid(child, child)
        theirs.close()
        their_holds.close()
        self.child = child
        self._chan = ours
        self._holds = holds
        # holds queue unread until the guard needs them (no wake-up of it per restored socket: measured, those
        # doubled the wall time of hold_one() on a busy machine); a full queue is read on request (hold_one())
        holds.setblocking(False)
        with contextlib.suppress(OSError):  # not permitted: SO_SNDBUF's limit, and the guard reads more often
            holds.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _HOLD_BUFFER)
        self.active: set[int] = set()
        self._ended = False  # ending() was sent: the process is being killed
        # requests sent with _tell(), whose replies the next _ask() reads (and drops) before its own
        self._unanswered = 0
        # a first round trip before any freeze: the child's start-up (pages copied on write) costs milliseconds
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self._ask("ping")
        except BaseException:
            self.close()
            raise

    def _send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(msg).encode()
        try:
            if fds:
                socket.send_fds(self._chan, [data], list(fds))
            else:
                self._chan.send(data)
        except (BrokenPipeError, ConnectionResetError):
            raise ProcessError(f"the guard of process {self.pid} exited", pid=self.pid) from None

    def _tell(self, op: str) -> None:
        """Send request `op` without waiting for its answer: the next _ask() reads it first, and drops it."""
        self._send({"op": op})
        self._unanswered += 1

    def _ask(self, op: str) -> dict[str, Any]:
        self._send({"op": op})
        # the guard answers in order: those of _tell() first
        while self._unanswered:
            self._unanswered -= 1
            with contextlib.suppress(ProcessError):  # nothing waited for it; the guard still answers
                self._answer(op)
        return self._answer(op)

    def _answer(self, op: str) -> dict[str, Any]:
        poller = select.poll()
        poller.register(self._chan, select.POLLIN)
        if not poller.poll(ANSWER_TIMEOUT * 1000):
            raise ProcessError(f"the guard of process {self.pid} did not answer {op!r} within {ANSWER_TIMEOUT:g} s",
                               pid=self.pid)
        try:
            line = self._chan.recv(1 << 16)
        except ConnectionResetError:
            line = b""
        if not line:
            raise ProcessError(f"the guard of process {self.pid} exited", pid=self.pid)
        reply: dict[str, Any] = json.loads(line)
        if not reply["ok"]:
            raise ProcessError(reply["error"], pid=self.pid)
        return reply

    def watch(self, fds: Sequence[int], tuples: Sequence[object]) -> None:
        """The process's fds (its own numbers) sockrepair may put in repair mode and the tuples it may lock: what
        the guard gives back if sockrepair dies before ending()."""
        names = [str(t) for t in tuples]
        for start in range(0, max(len(fds), 1), _CHUNK):
            self._send({"op": "watch" if start == 0 else "watch+", "fds": list(fds[start : start + _CHUNK]),
                        "tuples": names[start : start + _CHUNK]})

    def reuse(self, fds: Sequence[int]) -> None:
        """The process's fds (among the watched) whose SO_REUSEADDR was set when checkpointed: if sockrepair dies
        before ending(), the guard sets it again when it takes them out of repair mode."""
        if fds:
            self._send({"op": "reuse", "fds": list(fds)})

    def ending(self) -> None:
        """Past the point of no return: if sockrepair dies from now on, the guard ends the process."""
        self._send({"op": "ending"})
        self._ended = True

    def reap(self) -> None:
        """After the SIGKILL of the ending: the guard collects the exits of the threads it traces (a ptrace stop),
        which nothing else can, so that the process's exit can be waited for. Raises ProcessError when the guard
        does not answer."""
        self._ask("reap")

    def landing(self, directory: Path, netns: str | None, ttl: float) -> None:
        """Before the restore: the sockets hold_one() will give are the watched connections, in the order watch()
        listed them; if sockrepair dies holding them, the guard saves them into the journal `directory`, locked
        again for `ttl` seconds in `netns`."""
        self._send({"op": "land", "where": {"directory": str(directory), "netns": netns, "ttl": ttl}})

    def hold_one(self, sock: socket.socket) -> None:
        """Give the guard a duplicate of the next restored socket, as soon as it is made (a few microseconds: one
        sendmsg), until release(): if sockrepair dies meanwhile, the kernel does not close the connection, and the
        guard locks it again, checkpoints it into the journal and closes it silently. The duplicates wait in the
        kernel, in flight to the guard (which keeps them alive whatever happens to sockrepair), until the guard
        takes them: when sockrepair is gone, at release(), or here when the queue is full."""
        # sendmsg itself, the fd packed here: socket.send_fds builds an array per call (measured: 2.6 -> 2.3 ms for
        # 1,000 holds)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(sock.fileno()))]
        try:
            try:
                self._holds.sendmsg(_HOLD_BUFFERS, rights)
            except OSError as e:
                # full: the socket buffer (EAGAIN), or the sender's count of files in flight (ETOOMANYREFS past
                # RLIMIT_NOFILE without CAP_SYS_RESOURCE, as in a rootless container): the guard takes them
                if e.errno not in (errno.EAGAIN, errno.ETOOMANYREFS):
                    raise
                self._ask("take")
                self._holds.setblocking(True)
                try:
                    self._holds.sendmsg(_HOLD_BUFFERS, rights)
                finally:
                    self._holds.setblocking(False)
        except (BrokenPipeError, ConnectionResetError):
            raise ProcessError(f"the guard of process {self.pid} exited", pid=self.pid) from None

    def guard_accepted(self, socks: Sequence[socket.socket], tuples: Sequence[object], index: Path) -> None:
        """Connections accepted from the process's listeners (`socks`, connections `tuples`), about to be locked
        and saved into the directory whose `index` file lists what it holds (backlog.carry): the guard holds
        duplicates of them until unguard_accepted(), and if sockrepair dies meanwhile it resets those `index` does
        not list (backlog.reset(): a RST marked SOCCR_MARK, which passes their lock) rather than leave their peers
        waiting for answers nobody gives; those it lists are closed silently (in repair mode), for their restore.
        Raises ProcessError when the guard exited."""
        fds = [sock.fileno() for sock in socks]
        names = [str(t) for t in tuples]
        for start in range(0, len(fds), SCM_MAX_FD):
            self._send({"op": "accepted", "tuples": names[start : start + SCM_MAX_FD], "index": str(index)},
                       fds[start : start + SCM_MAX_FD])

    def unguard_accepted(self) -> None:
        """The accepted connections are saved, or reset here: the guard closes its duplicates (the last close of
        one reset here sends its RST). Raises ProcessError when the guard exited."""
        self._send({"op": "accepted-done"})

    def handing(self) -> None:
        """The handoff begins: if sockrepair dies now, the guard leaves the sockets another process holds to it."""
        self._send({"op": "handing"})

    def release(self) -> None:
        """The restored sockets are in the caller's program now (or saved): the guard closes its duplicates."""
        self._ask("release")

    @contextlib.contextmanager
    def frozen(self) -> Iterator[str]:
        """Yields the method used ("cgroup", "ptrace" or "sigstop"); the process goes on on every way out. Under
        ptrace, `.active` is then the threads that were not blocked in a system call (sockrepair.move.quiesce)."""
        reply = self._ask("stop")
        method = str(reply["method"])
        self.active = {int(t) for t in reply.get("active", [])}
        try:
            yield method
        finally:
            # closed already (an interrupt between this generator's yield and the with-block left it to the garbage
            # collector): the guard let the process go as it exited
            if self.child > 0:
                if self._ended:
                    # killed: nothing waits for its thaw (under ptrace, the guard collects the killed threads:
                    # milliseconds the restore would wait); wait_exited()'s reap reads the answer
                    self._tell("cont")
                else:
                    self._ask("cont")

    def close(self) -> None:
        if self.child > 0:
            with contextlib.suppress(OSError, ProcessError):
                self._send({"op": "close"})
            self._chan.close()
            self._holds.close()
            deadline = time.monotonic() + ANSWER_TIMEOUT
            while os.waitpid(self.child, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:  # stuck: ours to end (ptrace lets the process go with it)
                    os.kill(self.child, signal.SIGKILL)
                    os.waitpid(self.child, 0)
                    break
                time.sleep(0.001)
            self.child = 0
        self.pidfd.close()

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[str]:
    """One stop of `pid` through its own guard: yields the method used ("cgroup", "ptrace" or "sigstop"). Raises
    ProcessError (gone, not permitted, sockrepair or an ancestor of it, or not stopped within FREEZE_TIMEOUT
    seconds)."""
    with Freezer(pid) as freezer, freezer.frozen() as method:
        yield method
