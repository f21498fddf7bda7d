"""dump() writes the connections of a running program into an image directory, then lets them go on there or ends
the program; inspect() reads them without disturbing them."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from sockrepair.engine._checkpoint import resume
from sockrepair.image.directory import Entry, prepare_dir, write_dir
from sockrepair.move.freeze import frozen
from sockrepair.move.keep import Keeper, Kept
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import ProcSocket, process_name, tcp_sockets
from sockrepair.move.stages import Stage, Timings
from sockrepair.move.take import captured, checkpoint_taken, end_source, process_locker
from sockrepair.state import TCP_ESTABLISHED, ConnectionState

STAYED = Kept(0, 0, False, "nothing kept: the connections stayed in the process, or were not locked")


class After(Enum):
    LEAVE_RUNNING = "leave-running"
    KILL = "kill"


@dataclass
class DumpReport:
    """What dump() did. `connections`: one dict per image, in the order written (the index entry's fields: "file",
    "fd" (the process's), "tuple", ..., plus "recv_queue", "send_queue" and "unsent" in bytes). `phases_ms`:
    milliseconds per stage, in the order run: freeze, lock (when locking), checkpoint, write, then resume
    (LEAVE_RUNNING) or kill and keep (KILL) (sockrepair.move.stages.Stage says what each does). `kept`: the peers'
    packets the lock kept until the dump ended, written to packets.img (sockrepair.move.keep.Kept; `delivered`
    counts those written)."""

    pid: int
    command: str
    directory: str
    after: str
    freeze_method: str
    connections: list[dict[str, Any]]
    phases_ms: dict[str, float]
    kept: Kept = STAYED

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "kept": self.kept.to_dict()}


def dump(pid: int, directory: Path, wanted: Sequence[int] | None = None, after: After = After.KILL,
         lock: bool = True, ttl: float = 60.0) -> DumpReport:
    """Write one image per connection of `pid` (every established one, or the fds in `wanted`) and index.json into
    `directory` (0700, images 0600). With After.KILL the process is ended (end_source) and the connections stay
    locked for `ttl` seconds, until a restore unlocks them; with LEAVE_RUNNING they go on in the process and are
    unlocked. `lock=False` takes no lock (the states may then move before the kill: end_source refuses). With KILL
    and the lock, what the peers send is kept from the lock on and written, as the dump ends, to packets.img
    (sockrepair.image.packets), which `sockrepair restore -D` delivers; what they send after the dump ended waits
    for their retransmission. With LEAVE_RUNNING it is delivered to the resumed sockets before the unlock, and what
    came meanwhile right after it.

    `directory` is created 0700, or must be an empty directory of the caller's that group and others cannot write
    (ImageError `.path` otherwise, before anything is frozen). Raises ProcessError (no such process, not permitted,
    fd not a TCP socket, nothing established; `.pid`, `.fd`)
    and SocketStateError (a socket not ESTABLISHED or changed while frozen; `.pid`, `.fd` the process's own, `.tuple`,
    `.tcp_state`); on an error the process is thawed with its connections as they were, and nothing is locked."""
    command = process_name(pid)
    timings = Timings("dump")
    # Refused (another user's, a symlink, not empty...) before anything is frozen or locked.
    dir_fd = prepare_dir(directory)
    try:
        locker = process_locker(pid) if lock else None
    except BaseException:
        os.close(dir_fd)
        raise
    keeper = Keeper([f"/proc/{pid}/ns/net"]) if lock else None
    kept = STAYED
    try:
        with captured(pid, wanted, locker, timings, ttl) as cap:
            with timings.timed(Stage.WRITE):
                entries = write_dir(directory, list(zip([s.fd for s in cap.sockets], cap.states)),
                                    {"pid": pid, "command": command, "host": socket.gethostname()}, dir_fd)
            if after is After.LEAVE_RUNNING:
                with timings.timed(Stage.RESUME):
                    for fd in cap.fds:
                        resume(fd)
                    if keeper is not None:  # what the peers sent while their connections were frozen
                        kept = keeper.deliver([s.tuple for s in cap.sockets], f"/proc/{pid}/ns/net")
                    if locker is not None:
                        locker.unlock([s.tuple for s in cap.sockets])
                    if keeper is not None:  # what the lock stopped after deliver() last looked
                        kept = keeper.deliver([s.tuple for s in cap.sockets], f"/proc/{pid}/ns/net")
            else:
                with timings.timed(Stage.KILL):
                    end_source(cap)
        if keeper is not None and after is After.KILL:
            with timings.timed(Stage.KEEP):
                kept = keeper.write(dir_fd, [s.tuple for s in cap.sockets])
    finally:
        os.close(dir_fd)
        if locker is not None:
            locker.close()
        if keeper is not None:
            keeper.close()
    return DumpReport(pid, command, str(directory), after.value, cap.freeze_method,
                      [_entry_view(e, s) for e, s in zip(entries, cap.states)], timings.ms, kept)


def _entry_view(entry: Entry, state: ConnectionState) -> dict[str, Any]:
    return {**entry.to_dict(), "recv_queue": len(state.recv_queue), "send_queue": len(state.send_queue),
            "unsent": state.unsent_len}


def inspect(pid: int) -> list[tuple[ProcSocket, ConnectionState | None, str]]:
    """A non-destructive look at every TCP socket of `pid`, ordered by fd: (socket, state, state name), where
    state is None for a socket that is not ESTABLISHED. Established ones are checkpointed and resumed without a
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
                state = checkpoint_taken(pid, s, fd)
                resume(fd)
                result.append((s, state, "ESTABLISHED"))
            finally:
                os.close(fd)
    return result
