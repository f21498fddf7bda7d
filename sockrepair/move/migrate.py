"""migrate(): move the connections of a running program to another namespace (host) and program, in one call,
with every phase timed: freeze, lock, checkpoint, serialize, close, network, transfer, restore, unlock, handoff."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sockrepair.engine._checkpoint import discard
from sockrepair.image import decode, encode
from sockrepair.lock import Locker
from sockrepair.move.land import restore_all
from sockrepair.move.take import Phases, _kill_frozen, captured, process_locker
from sockrepair.netns import named
from sockrepair.state import ConnTuple

Handoff = Callable[[list[socket.socket], list[ConnTuple]], object]


@dataclass
class MigrationReport:
    """What migrate() did: the source `pid`, the `connections` moved (ConnTuple text, local first), how the
    process was frozen (`freeze_method`), each phase's duration in milliseconds (`phases_ms`: freeze, lock,
    checkpoint, serialize, close, network, transfer, restore, unlock, handoff, those that ran), `downtime_ms` from
    the freeze until the connections were live and unlocked, `image_bytes` the total size of the connection images,
    and `handoff_result` what `handoff` returned (left out of to_dict())."""

    pid: int
    connections: list[str]
    freeze_method: str
    phases_ms: dict[str, float]
    downtime_ms: float
    image_bytes: int
    handoff_result: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field but handoff_result, times rounded to the microsecond."""
        return {"pid": self.pid, "connections": self.connections, "freeze_method": self.freeze_method,
                "phases_ms": {k: round(v, 3) for k, v in self.phases_ms.items()},
                "downtime_ms": round(self.downtime_ms, 3), "image_bytes": self.image_bytes}


def migrate(pid: int, *, wanted: Sequence[int] | None = None, dest_netns: str | None = None,
            network: Callable[[], object] | None = None, handoff: Handoff | None = None,
            ttl: float = 60.0) -> MigrationReport:
    """Freeze `pid`, lock and checkpoint its connections (all established ones, or the fds in `wanted`), end the
    process silently, run `network` (e.g. move the service address), restore the connections inside `dest_netns`
    (None: here), unlock, and pass the sockets to `handoff`. The connections are locked in the source namespace and
    in the destination one from before the first checkpoint until they are live again.

    `wanted` are fd numbers in `pid`; `dest_netns` a name from `ip netns list`; `handoff(sockets, tuples)` gets the
    restored sockets (the caller's to close) in the order of `tuples`; `ttl` is the lock's timeout in seconds.
    Raises ProcessError (no such process, no ptrace access to it, or it holds no established connection or not
    those fds), NotPermittedError (no CAP_NET_ADMIN), SocketStateError, LockError/NftError, NetnsError, and what
    restore() raises; until the sockets are closed in the source, an error resumes them and thaws the process.
    """
    phases = Phases()
    source_locker = process_locker(pid)
    with named(dest_netns):
        dest_locker = Locker()
    try:
        # table and rules built before the freeze: inside it, locking is one element transaction per namespace
        source_locker.prepare()
        dest_locker.prepare()
        with captured(pid, wanted, source_locker, phases, ttl) as cap:
            tuples = [s.tuple for s in cap.sockets]
            start = cap.frozen_at
            with phases.timed("lock"):
                dest_locker.lock(tuples, ttl=ttl)
            with phases.timed("serialize"):
                images = [encode(state) for state in cap.states]
            with phases.timed("close"):
                for fd, state in zip(cap.fds, cap.states):
                    discard(fd, state)
                cap.fds.clear()
                _kill_frozen(cap.pidfd)
        if network is not None:
            with phases.timed("network"):
                network()
        with phases.timed("transfer"):
            states = [decode(image) for image in images]
        with phases.timed("restore"):
            socks = restore_all(states, dest_netns)
        with phases.timed("unlock"):
            dest_locker.unlock(tuples)
            source_locker.unlock(tuples)
        downtime = (time.perf_counter() - start) * 1000
        result = None
        if handoff is not None:
            with phases.timed("handoff"):
                result = handoff(socks, tuples)
    finally:
        source_locker.close()
        dest_locker.close()
    return MigrationReport(pid, [str(t) for t in tuples], cap.freeze_method, phases.ms, downtime,
                           sum(map(len, images)), result)
