"""dump() writes the connections of a running program into an image directory, then lets them go on there or ends
the program; inspect() reads them without disturbing them."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sockrepair.engine._checkpoint import resume
from sockrepair.engine._repair import in_repair
from sockrepair.engine._states import REPAIRABLE
from sockrepair.errors import SocketStateError
from sockrepair.image.directory import INDEX, NO_FD, Entry, append_dir, prepare_dir
from sockrepair.move.backlog import carry, reset, reset_taken
from sockrepair.move.freeze import frozen
from sockrepair.move.journal import ENDED, mark_ended, write_images
from sockrepair.move.keep import Keeper, Kept
from sockrepair.move.land import passing_lock
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import ProcSocket, process_name, tcp_sockets
from sockrepair.move.quiesce import Quiescence
from sockrepair.move.stages import Stage, Timings
from sockrepair.move.take import (
    Captured,
    captured,
    checkpoint_taken,
    end_source,
    process_locker,
    resume_in_repair,
)
from sockrepair.sigmask import deferred_signals
from sockrepair.state import ConnectionState, ConnTuple

STAYED = Kept(0, 0, False, "nothing kept: the connections stayed in the process, or were not locked")


class After(Enum):
    LEAVE_RUNNING = "leave-running"
    KILL = "kill"


@dataclass
class DumpReport:
    """What dump() did. `connections`: one dict per image, in the order written (the index entry's fields: "file",
    "fd" (the process's; image.directory.NO_FD, -1, after them, for those that waited in its listeners' accept
    queues when a KILL ended it: sockrepair.move.backlog), "tuple", ..., plus "recv_queue", "send_queue" and
    "unsent" in bytes). `phases_ms`:
    milliseconds per stage, in the order run: freeze, lock (when locking), checkpoint, write, then resume
    (LEAVE_RUNNING) or kill and keep (KILL) (sockrepair.move.stages.Stage says what each does). `lost`: the
    connections the kill destroyed, accepted with allow_loss (sockrepair.move.take.Unmovable.to_dict: "fd",
    "protocol", "tuple", "state", "reason"); always empty with LEAVE_RUNNING. `kept`: the peers' packets the lock
    kept (sockrepair.move.keep.Kept): with KILL written to packets.img (`delivered` counts those written; `note`
    names the keeper that goes on keeping, or why there is none), with LEAVE_RUNNING delivered to the resumed
    sockets. `quiescent`: whether every thread was waiting when the program
    was frozen, after `freeze_attempts` tries; `busy`: the threads that were not (sockrepair.move.quiesce).
    `left_behind`: the process's fds found already in repair mode in a stopped process, as a move killed half-way
    leaves it (docs/failures.md); LEAVE_RUNNING resumed them (those it could not move too: it resumes those of a
    running process as well) and continued the process."""

    pid: int
    command: str
    directory: str
    after: str
    freeze_method: str
    connections: list[dict[str, Any]]
    phases_ms: dict[str, float]
    lost: list[dict[str, Any]] = field(default_factory=list)
    kept: Kept = STAYED
    quiescent: bool = True
    freeze_attempts: int = 1
    busy: list[str] = field(default_factory=list)
    left_behind: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "kept": self.kept.to_dict()}


def dump(pid: int, directory: Path, wanted: Sequence[int] | None = None, after: After = After.KILL,
         lock: bool = True, ttl: float = 60.0, allow_loss: bool = False,
         quiescence: Quiescence = Quiescence()) -> DumpReport:
    """Write one image per connection of `pid` (every repairable one, or the fds in `wanted`) and index.json into
    `directory` (0700, images 0600). With After.KILL the process is ended (end_source) and the connections stay
    locked for `ttl` seconds, until a restore unlocks them; with LEAVE_RUNNING they go on in the process and are
    unlocked. `lock=False` takes no lock (the states may then move before the kill: end_source refuses). The
    program is frozen while every thread waits, as `quiescence` says (busy: refused, or moved and reported). The
    images are fsynced before the process is ended; the index records what makes them stale later (the source's
    start time, `after`, the lock's expiry: sockrepair.move.journal), which `sockrepair restore` checks.
    With KILL and the lock, what the peers send is kept from the lock on and written, as the dump ends, to
    packets.img (sockrepair.image.packets), and a detached keeper goes on keeping what they send after the dump
    ended into kept.img until the restore takes over or the lock expires (sockrepair.move.keeper); `sockrepair
    restore -D` delivers both. With LEAVE_RUNNING it is delivered to the resumed sockets before the
    unlock, and what came meanwhile right after it. With After.KILL, every other connection of the process (not
    repairable, not plain TCP, or not in `wanted`) would be reset by the kill: dump refuses before freezing
    anything, naming each, unless `allow_loss`, and the report then lists them in `lost`.

    `directory` is created 0700, or must be an empty directory of the caller's that group and others cannot write
    (ImageError `.path` otherwise, before anything is frozen). Raises ProcessError (no such process, not permitted,
    fd not a TCP socket, nothing to move; `.pid`, `.fd`) and SocketStateError (a connection that cannot be moved, a
    socket changed while frozen; `.pid`, `.fd` the process's own, `.tuple`, `.tcp_state`); on an error before the
    kill the process is thawed with its connections as they were, nothing is locked, and a directory the dump made
    is removed. An error once the kill began (the source cannot go on any more) passes through with `.journal` set
    to `directory`, whose images a restore completes the move from."""
    command = process_name(pid)
    timings = Timings("dump")
    # Refused (another user's, a symlink, not empty...) before anything is frozen or locked.
    made = not os.path.lexists(directory)
    dir_fd = prepare_dir(directory)
    try:
        locker = process_locker(pid) if lock else None
    except BaseException:
        _abandon_dir(dir_fd, directory, made)
        raise
    keeper = Keeper([f"/proc/{pid}/ns/net"]) if lock else None
    kept = STAYED
    cap: Captured | None = None
    accepted: list[ConnectionState] = []
    try:
        kills = after is After.KILL
        group = keeper.group_in(f"/proc/{pid}/ns/net") if keeper is not None else None
        # every connection of a program that is ended, locked until the restore: the ones still waiting in its
        # listeners' accept queues go too (sockrepair.move.backlog)
        with captured(pid, wanted, locker, timings, ttl, quiescence, allow_loss=allow_loss or not kills,
                      keep_errors=not kills, group=group,
                      backlog=kills and wanted is None and locker is not None) as cap:
            with timings.timed(Stage.WRITE):
                entries = write_images(directory, pid, list(zip([s.fd for s in cap.sockets], cap.states)),
                                       after=after.value, ttl=ttl, dir_fd=dir_fd)
            if after is After.LEAVE_RUNNING:
                # while the kept packets are delivered, what the resumed sockets send (their ACKs of them) passes the
                # lock, as a restored socket's does (sockrepair.move.land.passing_lock)
                with timings.timed(Stage.RESUME), (passing_lock(cap.fds, cap.states) if keeper is not None
                                                   else contextlib.nullcontext()):
                    for fd in cap.fds:
                        resume(fd)
                    if keeper is not None:  # what the peers sent while their connections were frozen
                        kept = keeper.deliver([s.tuple for s in cap.sockets], f"/proc/{pid}/ns/net")
                    if locker is not None:
                        locker.unlock([s.tuple for s in cap.sockets])
                    if keeper is not None:  # what the lock stopped after deliver() last looked
                        kept = keeper.deliver([s.tuple for s in cap.sockets], f"/proc/{pid}/ns/net")
                    # those no move can take, too (a move killed half-way, its guard too): the program goes on
                    resumed = resume_in_repair(cap.pidfd, cap.lost)
                    if cap.stopped:
                        cap.left_behind += resumed
                    if cap.left_behind:  # left stopped by an interrupted move: its sockets are right again now
                        os.kill(pid, signal.SIGCONT)
            else:
                with timings.timed(Stage.KILL):
                    end_source(cap, passed=lambda: mark_ended(directory))
                    if cap.backlog.socks and locker is not None:
                        def saved(states: list[ConnectionState], _tuples: list[ConnTuple]) -> None:
                            entries.extend(append_dir(directory, dir_fd, [(NO_FD, st) for st in states]))

                        # no Ctrl-C between their lock and their images: what it interrupted would be locked, in
                        # nobody's care
                        moved = [s.tuple for s in cap.sockets]
                        reset_taken(cap.backlog, moved)
                        with deferred_signals():
                            accepted = carry(cap.backlog, moved, [(locker, group)], ttl, saved, cap.freezer,
                                             directory / INDEX)
        if keeper is not None and after is After.KILL:
            with timings.timed(Stage.KEEP):
                # the lock holds `ttl` seconds from before this: the keeper outlives it a little, never the reverse
                kept = keeper.hand_off(dir_fd, [s.tuple for s in cap.sockets] + cap.backlog.tuples,
                                       time.time() + ttl)
    except BaseException as exc:
        if cap is not None:  # accepted from the backlog, not carried: ended as the program's exit would
            reset(cap.backlog)
        if cap is not None and cap.ended:
            with contextlib.suppress(AttributeError):
                exc.journal = str(directory)  # type: ignore[attr-defined]
            force = "" if (directory / ENDED).exists() else " --force"  # mark_ended failed
            exc.add_note(f"the process was ended; its connections are saved in {directory}: restore them with "
                         f"`sockrepair restore -D {shlex.quote(str(directory))}{force} --unix PATH` (or --exec CMD) "
                         f"before the lock's {ttl:g} s run out")
        _abandon_dir(dir_fd, directory, made)
        dir_fd = -1
        raise
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
        if locker is not None:
            locker.close()
        if keeper is not None:
            keeper.close()
    return DumpReport(pid, command, str(directory), after.value, cap.freeze_method,
                      [_entry_view(e, s) for e, s in zip(entries, [*cap.states, *accepted], strict=True)], timings.ms,
                      [u.to_dict() for u in cap.lost] if kills else [], kept, cap.freeze.quiescent,
                      cap.freeze.attempts, [str(b) for b in cap.freeze.busy], cap.left_behind)


def _abandon_dir(dir_fd: int, directory: Path, made: bool) -> None:
    """A dump that failed leaves no directory it made, unless something was written into it (the images of a dump
    that failed after its write: they may be all that is left of the connections)."""
    os.close(dir_fd)
    if made:
        with contextlib.suppress(OSError):  # ENOTEMPTY: keep what was written
            os.rmdir(directory)


def _entry_view(entry: Entry, state: ConnectionState) -> dict[str, Any]:
    return {**entry.to_dict(), "recv_queue": len(state.recv_queue), "send_queue": len(state.send_queue),
            "unsent": state.unsent_len}


# what inspect() adds to the state name of a socket it found in repair mode
IN_REPAIR = " (in repair mode)"


def inspect(pid: int) -> list[tuple[ProcSocket, ConnectionState | None, str]]:
    """A non-destructive look at every TCP socket of `pid`, ordered by fd: (socket, state, state name), where
    state is None for a socket in a state the engine does not repair (LISTEN, SYN_RECV...) or that a move cannot
    take (the name then says why), and the name begins "<STATE> (in repair mode)" (IN_REPAIR) for one found in
    repair mode (left so by a move killed half-way: it stays so, whatever its checkpoint finds). A socket in CLOSE
    with an error pending is listed without a state: reading the error (as a checkpoint does) would clear it. One
    closed while inspect looks is left out. The others are checkpointed and resumed without a window probe while the
    process is frozen for the few microseconds that takes. Raises ProcessError as dump() does."""
    result: list[tuple[ProcSocket, ConnectionState | None, str]] = []
    listed = tcp_sockets(pid)
    if not any(s.tcp_state in REPAIRABLE for s in listed):
        return [(s, None, s.state_name) for s in listed]
    with PidFd(pid) as pidfd, frozen(pid):
        for s in listed:  # read once: a socket accepted since is not listed half-known
            if s.tcp_state not in REPAIRABLE:
                result.append((s, None, s.state_name))
                continue
            if s.error_pending:
                # a checkpoint reads the error, which clears it: the program would never see it
                result.append((s, None, f"{s.state_name}, an error pending (left unread: only a move reads it)"))
                continue
            fd = pidfd.getfd_if_same(s.fd, s.inode)
            if fd is None:  # closed since the listing: a busy server closes connections all the time
                continue
            try:
                # one already in repair mode (a move killed half-way) is left so, even when its checkpoint fails:
                # inspect changes nothing
                was_in_repair = in_repair(fd)
                state = checkpoint_taken(pid, s, fd, leave_in_repair=was_in_repair)
                if not was_in_repair:
                    resume(fd)
                result.append((s, state, f"{s.state_name}{IN_REPAIR}" if was_in_repair else s.state_name))
            except SocketStateError as exc:
                # refused before repair mode (or resumed): listed with why a move cannot take it
                where = IN_REPAIR if was_in_repair else ""
                result.append((s, None, f"{s.state_name}{where}, cannot be moved: {exc}"))
            finally:
                os.close(fd)
    return result
