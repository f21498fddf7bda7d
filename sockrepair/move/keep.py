"""What the peers send while their connections move is kept and delivered, so that no peer waits its retransmission
timeout: a recorder (lock/record.py) in every namespace where the connections are locked, from before the freeze,
and after the restore the kept packets delivered in the destination (lock/inject.py), before the unlock, in the
order the locks saw them (the source's first: the peers sent there before the network moved).

Keeping is best effort by construction: a recorder that cannot bind (another mover records in that namespace) or
whose caps are reached leaves those packets to the plain dropping lock, and the counts say so."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from sockrepair.errors import LockError
from sockrepair.lock.inject import Injector
from sockrepair.lock.record import Caps, Held, Recorder
from sockrepair.netns import inside
from sockrepair.state import ConnTuple


@dataclass(frozen=True)
class Kept:
    """What keeping did for one move: `delivered` packets sent to the restored sockets; `fell_back` packets the
    peers must resend after their retransmission timeout (over a cap, or lost by the recorder; a lower bound when
    `recording` is False, nothing having been counted); `note` says why recording was off."""

    delivered: int
    fell_back: int
    recording: bool
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"delivered": self.delivered, "fell_back": self.fell_back, "recording": self.recording,
                "note": self.note}


def _netns_path(name: str | None) -> str:
    return f"/run/netns/{name}" if name else "/proc/thread-self/ns/net"


def _same_namespace(a: str, b: str) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino


class Keeper:
    """Recorders for a move from the namespace at `source` (a path: /proc/PID/ns/net) to the one named `dest_netns`
    (None: this thread's). Made before the freeze; deliver() after the restore; close() always."""

    def __init__(self, source: str, dest_netns: str | None, caps: Caps = Caps()) -> None:
        self.dest_netns = dest_netns
        self.note = ""
        self._recorders: list[Recorder] = []
        try:
            for path in (source, _netns_path(dest_netns)):
                if self._recorders and _same_namespace(path, source):
                    break
                with inside(path):
                    self._recorders.append(Recorder(caps=caps))
        except LockError as exc:
            self.close()
            self._recorders = []
            self.note = f"not keeping the peers' packets: {exc}"

    def deliver(self, tuples: Sequence[ConnTuple]) -> Kept:
        """Send what was kept for `tuples` to the restored sockets in the destination; they must be out of repair
        mode, the lock still held. Raises LockError when the kernel refuses a packet."""
        if not self._recorders:
            return Kept(0, 0, False, self.note)
        held = Held()
        for recorder in self._recorders:
            held.extend(recorder.take(tuples))
        with inside(_netns_path(self.dest_netns)), Injector() as injector:
            delivered = injector.send(held.packets)
        return Kept(delivered, held.fell_back, True)

    def close(self) -> None:
        for recorder in self._recorders:
            with contextlib.suppress(OSError):
                recorder.close()
