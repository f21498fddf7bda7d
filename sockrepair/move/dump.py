"""dump() writes the connections of a running program into an image directory, then lets them go on there or ends
the program; inspect() reads them without disturbing them."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sockrepair.engine._checkpoint import resume
from sockrepair.engine._repair import in_repair
from sockrepair.image.directory import Entry
from sockrepair.move.freeze import frozen
from sockrepair.move.journal import write_images
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
)
from sockrepair.state import TCP_ESTABLISHED, ConnectionState


class After(Enum):
    LEAVE_RUNNING = "leave-running"
    KILL = "kill"


@dataclass
class DumpReport:
    """What dump() did. `connections`: one dict per image, in the order written (the index entry's fields: "file",
    "fd" (the process's), "tuple", ..., plus "recv_queue", "send_queue" and "unsent" in bytes). `phases_ms`:
    milliseconds per stage, in the order run: freeze, lock (when locking), checkpoint, write, then resume
    (LEAVE_RUNNING) or kill (KILL) (sockrepair.move.stages.Stage says what each does). `quiescent`: whether every
    thread was waiting when the program was frozen, after `freeze_attempts` tries; `busy`: the threads that were
    not (sockrepair.move.quiesce). `left_behind`: the process's fds found already in repair mode in a stopped process,
    as a move killed half-way leaves it (docs/failures.md); LEAVE_RUNNING resumed them and continued the process."""

    pid: int
    command: str
    directory: str
    after: str
    freeze_method: str
    connections: list[dict[str, Any]]
    phases_ms: dict[str, float]
    quiescent: bool = True
    freeze_attempts: int = 1
    busy: list[str] = field(default_factory=list)
    left_behind: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def dump(pid: int, directory: Path, wanted: Sequence[int] | None = None, after: After = After.KILL,
         lock: bool = True, ttl: float = 60.0, quiescence: Quiescence = Quiescence()) -> DumpReport:
    """Write one image per connection of `pid` (every established one, or the fds in `wanted`) and index.json into
    `directory` (0700, images 0600). With After.KILL the process is ended (end_source) and the connections stay
    locked for `ttl` seconds, until a restore unlocks them; with LEAVE_RUNNING they go on in the process and are
    unlocked. `lock=False` takes no lock (the states may then move before the kill: end_source refuses). The
    program is frozen while every thread waits, as `quiescence` says (busy: refused, or moved and reported). The
    images are fsynced before the process is ended; the index records what makes them stale later (the source's
    start time, `after`, the lock's expiry: sockrepair.move.journal), which `sockrepair restore` checks.

    Raises ProcessError (no such process, not permitted, fd not a TCP socket, nothing established; `.pid`, `.fd`)
    and SocketStateError (a socket not ESTABLISHED or changed while frozen; `.pid`, `.fd` the process's own, `.tuple`,
    `.tcp_state`); on an error before the kill the process is thawed with its connections as they were, and nothing
    is locked. An error once the kill began (the source cannot go on any more) passes through with `.journal` set
    to `directory`, whose images a restore completes the move from."""
    command = process_name(pid)
    timings = Timings("dump")
    locker = process_locker(pid) if lock else None
    cap: Captured | None = None
    try:
        with captured(pid, wanted, locker, timings, ttl, quiescence) as cap:
            with timings.timed(Stage.WRITE):
                entries = write_images(directory, pid, list(zip([s.fd for s in cap.sockets], cap.states)),
                                       after=after.value, ttl=ttl)
            if after is After.LEAVE_RUNNING:
                with timings.timed(Stage.RESUME):
                    for fd in cap.fds:
                        resume(fd)
                    if locker is not None:
                        locker.unlock([s.tuple for s in cap.sockets])
                    if cap.left_behind:  # left stopped by an interrupted move: its sockets are right again now
                        os.kill(pid, signal.SIGCONT)
            else:
                with timings.timed(Stage.KILL):
                    end_source(cap)
    except BaseException as exc:
        if cap is not None and cap.ended:
            with contextlib.suppress(AttributeError):
                exc.journal = str(directory)  # type: ignore[attr-defined]
            exc.add_note(f"the process was ended; its connections are saved in {directory}: restore them with "
                         f"`sockrepair restore -D {directory}` before the lock's {ttl:g} s run out")
        raise
    finally:
        if locker is not None:
            locker.close()
    return DumpReport(pid, command, str(directory), after.value, cap.freeze_method,
                      [_entry_view(e, s) for e, s in zip(entries, cap.states)], timings.ms, cap.freeze.quiescent,
                      cap.freeze.attempts, [str(b) for b in cap.freeze.busy], cap.left_behind)


def _entry_view(entry: Entry, state: ConnectionState) -> dict[str, Any]:
    return {**entry.to_dict(), "recv_queue": len(state.recv_queue), "send_queue": len(state.send_queue),
            "unsent": state.unsent_len}


def inspect(pid: int) -> list[tuple[ProcSocket, ConnectionState | None, str]]:
    """A non-destructive look at every TCP socket of `pid`, ordered by fd: (socket, state, state name), where
    state is None for a socket that is not ESTABLISHED, and the name "ESTABLISHED (in repair mode)" for one found in
    repair mode (left so by a move killed half-way: it stays so). Established ones are checkpointed and resumed without a
    window probe while the process is frozen for the few microseconds that takes; others are listed as they are.
    Raises ProcessError and SocketStateError (naming the process's pid and fd) as dump() does."""
    result: list[tuple[ProcSocket, ConnectionState | None, str]] = []
    listed = tcp_sockets(pid)
    if not any(s.tcp_state == TCP_ESTABLISHED for s in listed):
        return [(s, None, s.state_name) for s in listed]
    with PidFd(pid) as pidfd, frozen(pid):
        for s in tcp_sockets(pid):
            if s.tcp_state != TCP_ESTABLISHED:
                result.append((s, None, s.state_name))
                continue
            fd = pidfd.getfd(s.fd)
            try:
                # one already in repair mode (a move killed half-way) is left so: inspect changes nothing
                was_in_repair = in_repair(fd)
                state = checkpoint_taken(pid, s, fd)
                if not was_in_repair:
                    resume(fd)
                result.append((s, state, "ESTABLISHED (in repair mode)" if was_in_repair else "ESTABLISHED"))
            finally:
                os.close(fd)
    return result
