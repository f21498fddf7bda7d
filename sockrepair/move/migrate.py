"""migrate(): move the connections of a running program to another namespace (host) and program, in one call,
with every stage timed (sockrepair.move.stages: freeze, lock, checkpoint, serialize, journal, close, network,
restore, deliver, unlock, handoff), the states made durable in a journal directory before the source is ended
(sockrepair.move.journal)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shlex
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockrepair.engine import checkpoint, discard
from sockrepair.errors import ProcessError
from sockrepair.image import encode
from sockrepair.image.directory import NO_FD
from sockrepair.lock import Locker
from sockrepair.lock.record import KeepCaps
from sockrepair.move.ask import ask_peers
from sockrepair.move.backlog import Backlog, carry, reset, reset_taken
from sockrepair.move.freeze import Freezer, close_passed
from sockrepair.move.journal import (
    ENDED,
    JOURNAL_INDEX,
    append_journal,
    discard_journal,
    given_directory,
    hold_directory,
    journal_head,
    mark_completed,
    mark_ended,
    new_directory,
    write_journal,
)
from sockrepair.move.keep import Keeper, Kept, netns_path
from sockrepair.move.land import passing_lock, restore_all
from sockrepair.move.quiesce import Quiescence
from sockrepair.move.stages import Stage, Timings
from sockrepair.move.take import (
    Captured,
    captured,
    end_source,
    process_locker,
    wait_exited,
)
from sockrepair.netns import named
from sockrepair.sigmask import deferred_signals
from sockrepair.state import ConnectionState, ConnTuple

log = logging.getLogger(__name__)

# the stages the steps of backlog.carry() add their time to
_CARRY_STAGES = {"lock": Stage.LOCK, "checkpoint": Stage.CHECKPOINT, "close": Stage.CLOSE}

Handoff = Callable[[list[socket.socket], list[ConnTuple]], object]


@dataclass
class MigrationReport:
    """What migrate() did.

    `pid`: the source process (now ended). `connections`: each moved connection as `LOCAL->REMOTE` text, in the
    process's fd order. `freeze_method`: "cgroup", "ptrace" or "sigstop". `quiescent`: whether every thread of the
    program was waiting when it was frozen (False only when the policy let a busy program move: a request it had
    read may be lost), after `freeze_attempts` tries; `busy`: the threads that were not waiting. `phases_ms`:
    milliseconds per stage, keyed by Stage.key in the order run: freeze, lock (source and destination added up),
    checkpoint, serialize, journal, close, network (only with `network`), restore, deliver, unlock, handoff (only
    with `handoff`). `downtime_ms`: milliseconds from the start of the kept freeze to the end of the unlock (the
    handoff is not in it). `frozen_at`: time.monotonic() (seconds) when that freeze began; the call's setup before
    it (the guard's fork, the look at the process, the lock's rules) takes milliseconds, more in a process of a
    large heap. `image_bytes`: the encoded states' total size. `journal`: the directory the states were made durable
    in before the source was ended (removed once the move completed, when migrate() created it). `kept`: the peers'
    packets kept by the lock and delivered to the restored sockets, and those left to the peers' retransmission
    (sockrepair.move.keep.Kept). `handoff_result`: what `handoff` returned (not in to_dict()). `sockets`: without a
    `handoff`, the restored connections, live, in the order of `connections`, then those of `accepted`: this process
    holds them now (closing one closes that connection; not in to_dict()). `accepted`: the connections that waited
    in the program's listeners' accept queues when it was ended (connected while it was frozen, say), accepted and
    handed off (without a handoff, in `sockets`) after the moved ones (sockrepair.move.backlog); into another
    namespace, those carried there (one that could not be checkpointed is reset, as before)."""

    pid: int
    connections: list[str]
    freeze_method: str
    phases_ms: dict[str, float]
    downtime_ms: float
    frozen_at: float
    image_bytes: int
    kept: Kept = field(default_factory=lambda: Kept(0, 0, False, "keeping was not asked for"))
    handoff_result: Any = field(default=None, repr=False)
    quiescent: bool = True
    freeze_attempts: int = 1
    busy: list[str] = field(default_factory=list)
    journal: str | None = None
    accepted: list[str] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON view: every field but handoff_result and sockets, milliseconds rounded to 3 decimals."""
        return {"pid": self.pid, "connections": self.connections, "freeze_method": self.freeze_method,
                "quiescent": self.quiescent, "freeze_attempts": self.freeze_attempts, "busy": self.busy,
                "phases_ms": {k: round(v, 3) for k, v in self.phases_ms.items()},
                "downtime_ms": round(self.downtime_ms, 3), "frozen_at": round(self.frozen_at, 6),
                "image_bytes": self.image_bytes,
                "kept": self.kept.to_dict(), "journal": self.journal, "accepted": self.accepted}


def _end_backlog(backlog: Backlog, handing: bool) -> None:
    """A move that failed after the kill: reset the connections accepted from the program's listeners (reset(): a
    RST, as the listener's close would have sent). After a `handoff` that failed, those another process holds (it
    passed them before it failed) are the program's now and only our copies are closed: reset() sets SO_MARK and
    SO_LINGER 0 on the socket, its copies included, and the program's orderly close would send a RST, let through
    any later lock."""
    if handing and backlog.socks:
        backlog.socks = [backlog.socks[i] for i in close_passed(backlog.socks)]
    reset(backlog)


def _journal_again(socks: list[socket.socket], tuples: list[ConnTuple], directory: Path, pid: int, fds: list[int],
                   locker: Locker, live: bool, ttl: float, netns: str | None) -> None:
    """A failure after the restore, with the restored sockets still here (not handed off): lock them again if they
    were live, checkpoint them (what they received meanwhile, kept packets delivered included, is in their state
    now), write that as the journal and close them silently, so that `sockrepair restore -D` continues from there
    rather than from the older images. A handoff that failed after giving some sockets away leaves them in repair
    mode in the program that took them: a `handoff` should take all or none."""
    if live:  # locked before the checkpoint: a socket in repair mode still takes in (and ACKs) what arrives
        locker.lock(tuples, ttl=ttl)
    with named(netns):
        states = [checkpoint(sock) for sock in socks]
    write_journal(directory, pid, fds, [encode(st) for st in states], tuples, ttl=ttl, netns=netns)
    for sock in socks:
        discard(sock)
    socks.clear()


# migrate() calls in other threads of this process that turned the cyclic collector off, and whether it was on
_gc_state = {"holders": 0, "was_on": False}
_gc_lock = threading.Lock()


def _gc_off() -> None:
    """Turn the cyclic garbage collector off for a move, until its _gc_on(). The collector is the process's: the
    last of concurrent moves turns it back on, and only if it was on before the first."""
    with _gc_lock:
        if _gc_state["holders"] == 0:
            _gc_state["was_on"] = gc.isenabled()
            gc.disable()
        _gc_state["holders"] += 1


def _gc_on() -> None:
    with _gc_lock:
        _gc_state["holders"] -= 1
        if _gc_state["holders"] == 0 and _gc_state["was_on"]:
            gc.enable()


def _same_namespace(a: str, b: str) -> bool:
    """Whether the network namespace files at paths `a` and `b` are one namespace."""
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def recovery_hint(directory: Path, dest_netns: str | None) -> str:
    """How to finish a move that stopped after its source was ended."""
    where = f" --netns {shlex.quote(dest_netns)}" if dest_netns else ""
    # unmarked (mark_ended failed): restore would take the images for those of a move undone before its end
    force = "" if (directory / ENDED).exists() else " --force"
    return (f"the source was ended; its connections are saved in {directory} and stay locked until the lock's ttl "
            f"ends: finish the move (after the network step, if it did not run) with `sockrepair restore -D "
            f"{shlex.quote(str(directory))}{where}{force} --unix PATH` (or --exec CMD)")


def migrate(pid: int, *, wanted: Sequence[int] | None = None, dest_netns: str | None = None,
            network: Callable[[], object] | None = None, handoff: Handoff | None = None,
            ttl: float = 60.0, keep: bool | KeepCaps = True, journal: str | Path | None = None,
            quiescence: Quiescence = Quiescence()) -> MigrationReport:
    """Freeze `pid` while every thread waits (`quiescence`: how long to try, and whether a program still busy then
    is refused or moved anyway; sockrepair.move.quiesce), lock and checkpoint its connections (all established
    ones, or the fds in `wanted`), write their states into the journal directory (fsynced unless it is the default
    one, under /run: sockrepair.move.journal.volatile), end the process
    silently (end_source), run `network` (e.g. move the service address), restore the connections inside
    `dest_netns` (an `ip netns` name; None: here), unlock, and pass the sockets with their tuples to `handoff`
    (when it moves every connection, followed by those that waited in its listeners' accept queues when it was
    ended: `accepted`, sockrepair.move.backlog; into another namespace they are restored there with the others).
    The ended process has exited (its listeners, and so their ports, gone) before the restore ends. Without a
    `handoff` the restored sockets are the report's `sockets`, this process's to keep, followed by those of
    `accepted`.
    The connections are locked in the source namespace and in the destination one, for at most `ttl` seconds, from
    before the first checkpoint until they are live again. With `keep`, what the peers send meanwhile is kept by
    the lock and delivered to the restored sockets before the unlock, so that no peer waits for its retransmission
    timeout (sockrepair.move.keep; the report's `kept` says how many packets, and how many fell back), within the
    default KeepCaps, or within those given as `keep`; False: the lock drops, as criu's do.

    `journal`: the directory to write the states into (created 0700 if missing; journal.img and journal.json, 0600,
    which `sockrepair restore -D` reads); None: a new one under /run/sockrepair, removed when the move completes. A
    directory given here is kept, marked completed (sockrepair.move.journal). The guard that freezes the program
    (sockrepair.move.freeze) also holds the restored sockets until the handoff: if this process is SIGKILLed at any
    point, the program goes on untouched (before the end of the source) or the journal holds every connection.

    Raises TypeError for a `keep` that is neither a bool nor a KeepCaps, and ImageError (`.path`) before anything
    is frozen when `journal` cannot hold a journal (not a directory,
    not the caller's, writable by others); ProcessError (`.pid`, `.fd`: no such process, not permitted, nothing
    established, busy and refused) and
    SocketStateError (`.pid`, `.fd` the process's own, `.tuple`, `.tcp_state`) before the process is ended: it is
    then thawed with its connections as they were, and the journal is discarded. Whatever is raised after that
    (errors of `network`, restore (RestoreError and its subclasses), `handoff`, KeyboardInterrupt...) passes
    through with `.journal` set to the directory (and a note saying how to finish the move with `sockrepair
    restore -D`); the connections stay locked until `ttl` ends.

    Python's cyclic garbage collector is off while migrate() runs (for every thread of the caller's process; back
    on when it returns, if it was on): its collections cost milliseconds inside the downtime."""
    if not isinstance(keep, (bool, KeepCaps)):  # a dict of caps, say, would move with the defaults unsaid
        raise TypeError(f"keep must be True, False or a sockrepair.KeepCaps, not {keep!r}")
    timings = Timings("migrate")
    source_locker = process_locker(pid)
    dest_locker = source_locker
    keeper: Keeper | None = None
    try:
        # named() first: it refuses a name that is empty or a path (netns_path("") is this namespace) before the
        # process is touched
        with named(dest_netns):
            # restored where they were (a new program in the same namespace): one lock, taken and released once
            if not _same_namespace(f"/proc/{pid}/ns/net", "/proc/thread-self/ns/net"):
                dest_locker = Locker()
        caps = keep if isinstance(keep, KeepCaps) else KeepCaps()
        keeper = Keeper([f"/proc/{pid}/ns/net", netns_path(dest_netns)], caps) if keep else None
        directory = new_directory(pid) if journal is None else given_directory(journal)
    except BaseException:
        # nothing was locked yet; the recorders would hold the log group bound until collected (the next move's
        # keeper then could not record)
        if keeper is not None:
            keeper.close()
        if dest_locker is not source_locker:
            dest_locker.close()
        source_locker.close()
        raise
    kept = Kept(0, 0, False, "keeping was not asked for")
    created = journal is None
    ended = False
    socks: list[socket.socket] = []
    taken: list[socket.socket] = []  # the restored sockets the caller gets when there is no handoff
    live = False  # the restored sockets were unlocked
    handing = False  # the handoff began: it may have passed some sockets before it failed
    freezer: Freezer | None = None
    cap: Captured | None = None
    accepted: list[ConnTuple] = []
    journal_fds: list[int] = []  # per journaled connection, the program's fd (NO_FD: one from an accept queue)
    held = -1
    # no cyclic collection until the move ends: 1,000 connections make enough objects for a few, 5 to 20 ms of the
    # downtime, and nothing the move makes needs collecting before it ends
    _gc_off()
    try:
        # held by this process and its guard until both are gone: `sockrepair restore -D` waits for that
        held = hold_directory(directory)
        # before the point of no return: if this process is killed past it, this says where the connections are
        # (so does `sockrepair restore --pending`, which finds /run/sockrepair/move-PID-*)
        log.info("moving the connections of process %d; journal: %s", pid, directory)
        # the guard outlives the capture: it holds the restored sockets until the handoff (sockrepair.move.freeze)
        freezer = Freezer(pid, inherit=[held])
        # table, rules and keep chains built before the freeze: inside it, locking is one element transaction per
        # namespace
        source_ns, dest_ns = f"/proc/{pid}/ns/net", netns_path(dest_netns)
        source_group = keeper.group_in(source_ns) if keeper is not None else None
        dest_group = keeper.group_in(dest_ns) if keeper is not None else None
        source_locker.prepare(source_group)
        if dest_locker is not source_locker:
            dest_locker.prepare(dest_group)
        head = journal_head(directory, pid, dest_netns)
        # every connection of a program: the ones still waiting in its listeners' accept queues go too
        # (sockrepair.move.backlog), to the handoff or to the caller
        backlog = wanted is None
        with captured(pid, wanted, source_locker, timings, ttl, quiescence, freezer, owed=True,
                      group=source_group, backlog=backlog) as cap:
            tuples = [s.tuple for s in cap.sockets]
            journal_fds = [s.fd for s in cap.sockets]
            start = cap.frozen_at
            if dest_locker is not source_locker:
                with timings.timed(Stage.LOCK):
                    dest_locker.lock(tuples, ttl=ttl, group=dest_group)
            # restored from these very states: the images are the journal's, for a restore in another process
            states = cap.states
            with timings.timed(Stage.SERIALIZE):
                images = [encode(state) for state in cap.states]
            with timings.timed(Stage.JOURNAL):
                write_journal(directory, pid, journal_fds, images, tuples, ttl=ttl, netns=dest_netns, head=head)
            with timings.timed(Stage.CLOSE):
                try:
                    # the tuples are free once our copies are disconnected: the process exits during the restore
                    end_source(cap, passed=lambda: mark_ended(directory, head.durable), wait=False)
                finally:
                    ended = cap.ended
        reset_taken(cap.backlog, tuples)  # handed off or carried, one on a moved tuple would fail the restore
        if cap.backlog.socks and dest_locker is not source_locker:
            carried_images: list[bytes] = []

            def journaled(more: list[ConnectionState], conns: list[ConnTuple]) -> None:
                with timings.timed(Stage.SERIALIZE):
                    made = [encode(state) for state in more]
                with timings.timed(Stage.JOURNAL):
                    append_journal(directory, [NO_FD] * len(more), made, conns)
                carried_images.extend(made)

            # no Ctrl-C between their lock and their journal: what it interrupted would be locked, in nobody's care
            with deferred_signals():
                carried = carry(cap.backlog, tuples, [(source_locker, source_group), (dest_locker, dest_group)], ttl,
                                journaled, freezer, directory / JOURNAL_INDEX,
                                lambda step: timings.timed(_CARRY_STAGES[step]))
            if carried:  # restored, delivered, unlocked and handed off with the moved ones from here on
                accepted = cap.backlog.tuples
                states, tuples = [*states, *carried], [*tuples, *accepted]
                images = [*images, *carried_images]
                journal_fds = [*journal_fds, *[NO_FD] * len(carried)]
                freezer.watch(journal_fds, tuples)  # what its guard saves if this process dies
                cap.backlog.tuples = []
        if network is not None:
            with timings.timed(Stage.NETWORK):
                network()
        freezer.landing(directory, dest_netns, ttl)
        with timings.timed(Stage.RESTORE):
            # what the peers hold of our in-flight bytes, asked once the old sockets are gone (sockrepair.move.ask)
            asked = ask_peers(keeper, states, netns_path(dest_netns), same_place=dest_locker is source_locker)
            socks = restore_all(asked.states, dest_netns, freezer.hold_one, asked.answered, cap.owed)
            # before any handoff: one that listens on the program's port (an upgrade in place) must find it free,
            # and the exit frees its listeners only after its memory, some 100 ms for a program of 256 MiB (waited for
            # after the handoff, such a handoff failed past the point of no return: EADDRINUSE)
            wait_exited(cap)
        with passing_lock(socks, states) if keeper is not None else contextlib.nullcontext():
            if keeper is not None:
                with timings.timed(Stage.DELIVER):
                    kept = keeper.deliver(tuples, netns_path(dest_netns))
            with timings.timed(Stage.UNLOCK):
                live = True
                dest_locker.unlock(tuples)
                if source_locker is not dest_locker:
                    source_locker.unlock(tuples)
                if keeper is not None:  # what the lock stopped after deliver() last looked: nothing else delivers it
                    kept = keeper.deliver(tuples, netns_path(dest_netns))
        since_freeze = time.perf_counter() - start
        downtime, frozen_at = since_freeze * 1000, time.monotonic() - since_freeze
        result = None
        if handoff is not None:
            with timings.timed(Stage.HANDOFF):
                handing = True
                freezer.handing()
                # after the moved connections, those that waited in the program's accept queues at its end
                accepted = [*accepted, *cap.backlog.tuples]
                result = handoff(socks + cap.backlog.socks, tuples + cap.backlog.tuples)
                socks, cap.backlog.socks = [], []  # the caller's program holds them now
                # marked before the guard lets go: killed in between, the guard finds them handed off
                mark_completed(directory, created)
                freezer.release()
        if socks:  # no handoff: the move ends here, the sockets go to the caller
            accepted = [*accepted, *cap.backlog.tuples]
            taken, socks, cap.backlog.socks = [*socks, *cap.backlog.socks], [], []
            mark_completed(directory, created)
            # the caller holds them now: a guard that does not answer must not make them part of an error
            with contextlib.suppress(ProcessError):
                freezer.release()
    except BaseException as exc:
        if not ended:
            discard_journal(directory, created)
            raise
        if live and not socks:  # handed off (or nothing to hand off to): the move is done, whatever failed after
            mark_completed(directory, created)
            raise
        with deferred_signals():
            if cap is not None:  # accepted from the backlog and not handed off: ended as the program's exit would
                _end_backlog(cap.backlog, handing)
            if socks and cap is not None:
                try:
                    _journal_again(socks, tuples, directory, pid, journal_fds, dest_locker, live, ttl, dest_netns)
                except Exception as again:
                    exc.add_note(f"the restored connections could not be saved again ({again}): the journal holds "
                                 "their states from before the restore")
                if freezer is not None:
                    with contextlib.suppress(ProcessError):
                        freezer.release()
        with contextlib.suppress(AttributeError):
            exc.journal = str(directory)  # type: ignore[attr-defined]
        exc.add_note(recovery_hint(directory, dest_netns))
        raise
    finally:
        _gc_on()
        if freezer is not None:
            freezer.close()
        if held >= 0:
            os.close(held)
        source_locker.close()
        if dest_locker is not source_locker:
            dest_locker.close()
        if keeper is not None:
            keeper.close()
    return MigrationReport(pid, [str(t) for t in tuples[: len(cap.sockets)]], cap.freeze_method, timings.ms, downtime,
                           frozen_at, sum(map(len, images)), kept, result, cap.freeze.quiescent, cap.freeze.attempts,
                           [str(b) for b in cap.freeze.busy], str(directory), [str(t) for t in accepted], taken)
