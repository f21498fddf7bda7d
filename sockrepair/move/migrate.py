"""migrate(): move the connections of a running program to another namespace (host) and program, in one call,
with every stage timed (sockrepair.move.stages: freeze, lock, checkpoint, serialize, close, network, transfer,
restore, deliver, unlock, handoff)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sockrepair.image import decode, encode
from sockrepair.lock import Locker
from sockrepair.move.keep import Keeper, Kept, netns_path
from sockrepair.move.land import restore_all
from sockrepair.move.stages import Stage, Timings
from sockrepair.move.take import captured, end_source, process_locker
from sockrepair.netns import named
from sockrepair.state import ConnTuple

Handoff = Callable[[list[socket.socket], list[ConnTuple]], object]


@dataclass
class MigrationReport:
    """What migrate() did.

    `pid`: the source process (now ended). `connections`: each moved connection as `LOCAL->REMOTE` text, in the
    process's fd order. `freeze_method`: "cgroup" or "sigstop". `phases_ms`: milliseconds per stage, keyed by
    Stage.key in the order run: freeze, lock (source and destination added up), checkpoint, serialize, close,
    network (only with `network`), transfer, restore, deliver, unlock, handoff (only with `handoff`). `downtime_ms`:
    milliseconds from the start of the freeze to the end of the unlock (the handoff is not in it). `image_bytes`:
    the encoded states' total size. `kept`: the peers' packets kept by the lock and delivered to the restored
    sockets, and those left to the peers' retransmission (sockrepair.move.keep.Kept). `handoff_result`: what
    `handoff` returned (not in to_dict())."""

    pid: int
    connections: list[str]
    freeze_method: str
    phases_ms: dict[str, float]
    downtime_ms: float
    image_bytes: int
    kept: Kept = field(default_factory=lambda: Kept(0, 0, False, "keeping was not asked for"))
    handoff_result: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON view: every field but handoff_result, milliseconds rounded to 3 decimals."""
        return {"pid": self.pid, "connections": self.connections, "freeze_method": self.freeze_method,
                "phases_ms": {k: round(v, 3) for k, v in self.phases_ms.items()},
                "downtime_ms": round(self.downtime_ms, 3), "image_bytes": self.image_bytes,
                "kept": self.kept.to_dict()}


def migrate(pid: int, *, wanted: Sequence[int] | None = None, dest_netns: str | None = None,
            network: Callable[[], object] | None = None, handoff: Handoff | None = None,
            ttl: float = 60.0, keep: bool = True) -> MigrationReport:
    """Freeze `pid`, lock and checkpoint its connections (all established ones, or the fds in `wanted`), end the
    process silently (end_source), run `network` (e.g. move the service address), restore the connections inside
    `dest_netns` (an `ip netns` name; None: here), unlock, and pass the sockets with their tuples to `handoff`.
    The connections are locked in the source namespace and in the destination one, for at most `ttl` seconds, from
    before the first checkpoint until they are live again. With `keep`, what the peers send meanwhile is kept by
    the lock and delivered to the restored sockets before the unlock, so that no peer waits for its retransmission
    timeout (sockrepair.move.keep; the report's `kept` says how many packets, and how many fell back).

    Raises ProcessError (`.pid`, `.fd`: no such process, not permitted, nothing established) and SocketStateError
    (`.pid`, `.fd` the process's own, `.tuple`, `.tcp_state`) before the process is ended: it is then thawed with
    its connections as they were. After that, errors of `network`, restore (RestoreError and its subclasses; the
    connections stay locked until `ttl` ends) and `handoff` pass through."""
    timings = Timings("migrate")
    source_locker = process_locker(pid)
    with named(dest_netns):
        dest_locker = Locker()
    keeper = Keeper([f"/proc/{pid}/ns/net", netns_path(dest_netns)]) if keep else None
    kept = Kept(0, 0, False, "keeping was not asked for")
    try:
        # table and rules built before the freeze: inside it, locking is one element transaction per namespace
        source_locker.prepare()
        dest_locker.prepare()
        with captured(pid, wanted, source_locker, timings, ttl) as cap:
            tuples = [s.tuple for s in cap.sockets]
            start = cap.frozen_at
            with timings.timed(Stage.LOCK):
                dest_locker.lock(tuples, ttl=ttl)
            with timings.timed(Stage.SERIALIZE):
                images = [encode(state) for state in cap.states]
            with timings.timed(Stage.CLOSE):
                end_source(cap)
        if network is not None:
            with timings.timed(Stage.NETWORK):
                network()
        with timings.timed(Stage.TRANSFER):
            states = [decode(image) for image in images]
        with timings.timed(Stage.RESTORE):
            socks = restore_all(states, dest_netns)
        if keeper is not None:
            with timings.timed(Stage.DELIVER):
                kept = keeper.deliver(tuples, netns_path(dest_netns))
        with timings.timed(Stage.UNLOCK):
            dest_locker.unlock(tuples)
            source_locker.unlock(tuples)
            if keeper is not None:  # what the lock stopped after deliver() last looked: nothing else delivers it
                kept = keeper.deliver(tuples, netns_path(dest_netns))
        downtime = (time.perf_counter() - start) * 1000
        result = None
        if handoff is not None:
            with timings.timed(Stage.HANDOFF):
                result = handoff(socks, tuples)
    finally:
        source_locker.close()
        dest_locker.close()
        if keeper is not None:
            keeper.close()
    return MigrationReport(pid, [str(t) for t in tuples], cap.freeze_method, timings.ms, downtime,
                           sum(map(len, images)), kept, result)
