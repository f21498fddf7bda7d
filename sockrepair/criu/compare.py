"""Checking criu against sockrepair: the same live connections checkpointed by both (sockrepair's non-destructive
inspect, then `criu dump --leave-running`), compared field by field. A field is the same, differs for a reason
that is checked (the timestamp clock ran on; traffic moved the queues and windows; an option criu does not keep),
or differs unexplained, which is a failure."""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockrepair.criu.explain import criu_error, explain_dir
from sockrepair.criu.images import load_connections
from sockrepair.criu.locate import Criu, find_criu
from sockrepair.criu.topology import map_trees
from sockrepair.engine.registry import not_in_criu
from sockrepair.move.dump import inspect
from sockrepair.move.freeze import refuse_self
from sockrepair.netns import inside
from sockrepair.state import ConnectionState, ConnTuple, Payload

SAME, EXPLAINED, NOT_KEPT, DIFFERS = "same", "explained", "not kept", "differs"
SEQ_MOD = 1 << 32
# Socket options criu's images have no field for (sk-opts/ip-opts/tcp-opts in criu 4.2), or that sockrepair's
# reader of criu's images does not take: the registry's carried entries marked criu=False.
NOT_IN_CRIU = not_in_criu()
# Buffer sizes autotune with traffic.
AUTOTUNED = ("sndbuf", "rcvbuf")
# Slack for the clock's tick between reading our end time and criu's exit being seen.
CLOCK_SLACK_MS = 2


@dataclass
class FieldResult:
    """One field of one connection: sockrepair's value, criu's, the verdict (SAME, EXPLAINED, NOT_KEPT or DIFFERS)
    and why, when not the same."""

    name: str
    ours: Any
    criu: Any
    verdict: str
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ConnectionComparison:
    tuple: ConnTuple
    fd: int
    fields: list[FieldResult]

    @property
    def failures(self) -> list[FieldResult]:
        return [f for f in self.fields if f.verdict == DIFFERS]

    def to_dict(self) -> dict[str, Any]:
        return {"tuple": str(self.tuple), "fd": self.fd, "ok": not self.failures,
                "fields": [f.to_dict() for f in self.fields]}


@dataclass
class Comparison:
    """`compare`'s result: `apart_ms` bounds the time between the two checkpoints; `missing` lists connections
    sockrepair saw and criu did not dump; `ok` is False on any DIFFERS field or missing connection."""

    pid: int
    criu_version: str
    apart_ms: float
    connections: list[ConnectionComparison]
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and all(not c.failures for c in self.connections)

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "criu_version": self.criu_version, "ok": self.ok, "apart_ms": self.apart_ms,
                "missing": self.missing, "connections": [c.to_dict() for c in self.connections]}


def _queue_view(data: Payload) -> str:
    return f"{len(data)} B sha256:{hashlib.sha256(data).hexdigest()[:12]}"


def _stream(name: str, ours_end: int, ours: Payload, criu_end: int, criu: Payload) -> tuple[str, str]:
    """One direction's queue as the two checkpoints hold it: (verdict, why). Sequence numbers are those at the END
    of each queue; a later checkpoint may be further on (more data arrived or was written, some was acknowledged
    or read), but wherever the two cover the same sequence range the bytes must be identical."""
    if ours_end == criu_end and ours == criu:
        return SAME, ""
    ahead = (criu_end - ours_end) % SEQ_MOD
    if ahead >= SEQ_MOD // 2:
        return DIFFERS, f"criu's {name} ends {SEQ_MOD - ahead} bytes BEFORE sockrepair's, which was taken first"
    ours_start = ours_end - len(ours)
    criu_start = (criu_end - len(criu)) % SEQ_MOD
    # Offsets relative to our queue's start, so wrap-around does not matter.
    criu_from = (criu_start - ours_start) % SEQ_MOD
    if criu_from >= SEQ_MOD // 2:
        return DIFFERS, f"criu's {name} starts {SEQ_MOD - criu_from} bytes before sockrepair's (data un-acked/unread?)"
    lo, hi = criu_from, min(len(ours), criu_from + len(criu))
    if lo < hi and ours[lo:hi] != criu[: hi - lo]:
        return DIFFERS, f"the {hi - lo} bytes both hold of the {name} are not the same"
    common = f"; the {hi - lo} bytes both hold are identical" if hi > lo else ""
    return EXPLAINED, (f"traffic between the two checkpoints: the {name} moved {ahead} bytes on and "
                       f"{criu_from} bytes were consumed{common}")


def compare_states(ours: ConnectionState, criu: ConnectionState, apart_ms: float) -> list[FieldResult]:
    """Field by field: state, sequences, queues, options, the timestamp clock, the repair window and every socket
    option of `ours` (taken first) against `criu` (taken at most `apart_ms` milliseconds later)."""
    out: list[FieldResult] = []
    send, send_why = _stream("send queue", ours.send_seq, ours.send_queue, criu.send_seq, criu.send_queue)
    recv, recv_why = _stream("receive queue", ours.recv_seq, ours.recv_queue, criu.recv_seq, criu.recv_queue)
    traffic = EXPLAINED in (send, recv)

    def moved(name: str, a: Any, b: Any, verdict: str, why: str) -> None:
        out.append(FieldResult(name, a, b, SAME if a == b else verdict, "" if a == b else why))

    moved("state", ours.tcp_state, criu.tcp_state, DIFFERS, "")
    moved("send_seq", ours.send_seq, criu.send_seq, send, send_why)
    moved("send_queue", _queue_view(ours.send_queue), _queue_view(criu.send_queue), send, send_why)
    moved("unsent_len", ours.unsent_len, criu.unsent_len, send if send != SAME else DIFFERS, send_why)
    moved("recv_seq", ours.recv_seq, criu.recv_seq, recv, recv_why)
    moved("recv_queue", _queue_view(ours.recv_queue), _queue_view(criu.recv_queue), recv, recv_why)
    for name, a in dataclasses.asdict(ours.options).items():
        moved(f"options.{name}", a, getattr(criu.options, name), DIFFERS, "")
    out.append(_timestamp(ours, criu, apart_ms))
    if ours.window is None or criu.window is None:
        out.append(FieldResult("window", ours.window, criu.window, SAME if ours.window == criu.window else NOT_KEPT,
                               "one side could not read TCP_REPAIR_WINDOW (kernel < 4.8 or an older image)"))
    else:
        for name, a in dataclasses.asdict(ours.window).items():
            moved(f"window.{name}", a, getattr(criu.window, name), EXPLAINED if traffic else DIFFERS,
                  "the window edges move with the traffic between the checkpoints" if traffic else "")
    for name, a in dataclasses.asdict(ours.sockopts).items():
        b = getattr(criu.sockopts, name)
        if name in NOT_IN_CRIU:
            out.append(FieldResult(f"sockopts.{name}", a, b, SAME if a == b else NOT_KEPT,
                                   "" if a == b else "criu's images have no field for this option"))
        elif name in AUTOTUNED:
            moved(f"sockopts.{name}", a, b, EXPLAINED if traffic else DIFFERS,
                  "the kernel autotunes buffer sizes as data flows" if traffic else "")
        else:
            moved(f"sockopts.{name}", a, b, DIFFERS, "")
    return out


def _timestamp(ours: ConnectionState, criu: ConnectionState, apart_ms: float) -> FieldResult:
    """TCP_TIMESTAMP is the connection's millisecond clock: criu's later reading is ahead by the time between the
    two, never more. (A microsecond-clock connection, flagged in the low bit, runs 1000 times faster.)"""
    a, b = ours.timestamp, criu.timestamp
    if a == b:
        return FieldResult("timestamp", a, b, SAME)
    ahead = (b - a) % SEQ_MOD
    bound = apart_ms + CLOCK_SLACK_MS
    if ahead <= bound:
        return FieldResult("timestamp", a, b, EXPLAINED,
                           f"the clock ran on {ahead} ms between the checkpoints (taken at most {apart_ms:.0f} ms "
                           "apart)")
    if a & b & 1 and ahead <= bound * 1000:
        return FieldResult("timestamp", a, b, EXPLAINED,
                           f"microsecond clock ran on {ahead} us (checkpoints at most {apart_ms:.0f} ms apart)")
    return FieldResult("timestamp", a, b, DIFFERS,
                       f"criu's clock is {ahead if ahead < SEQ_MOD // 2 else ahead - SEQ_MOD} ticks from ours, but "
                       f"the checkpoints were at most {apart_ms:.0f} ms apart")


def compare(pid: int, criu: Criu | None = None) -> Comparison:
    """Checkpoint `pid`'s established connections with sockrepair (non-destructive), then dump its tree with
    `criu dump --leave-running --network-lock skip` (the connections go on), and compare every connection.

    Raises CriuError when criu does not work here or `pid` is not there, CriuFailure (with the logs' report) when
    the dump fails, ImageError when criu's images cannot be read, ProcessError before criu runs for a pid that is
    sockrepair or one of its ancestors; a failure to inspect `pid` is raised as inspect
    raises it (ProcessError, NotPermittedError)."""
    refuse_self(pid, "criu would dump sockrepair in its tree")
    criu = (criu or find_criu()).require_working()
    tree = map_trees([pid]).trees[0]
    netns = f"/proc/{pid}/ns/net"
    with tempfile.TemporaryDirectory(prefix="sockrepair-compare-") as tmp:
        images = Path(tmp)
        args = ["dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "--leave-running", "--tcp-established"]
        if criu.supports_network_lock_skip():
            args += ["--network-lock", "skip"]
        if tree.needs_shell_job:
            args.append("--shell-job")
        start = time.monotonic()
        rows = inspect(pid)
        with inside(netns):
            done = criu.run(args)
        apart_ms = (time.monotonic() - start) * 1000
        if done.returncode != 0:
            raise criu_error(f"dump --leave-running of {pid}", explain_dir(images, done.stderr),
                             f"exit status {done.returncode}")
        theirs = {s.tuple: s for s in load_connections(images)}
    result = Comparison(pid, criu.version, round(apart_ms, 3), [])
    for sock, state, _name in rows:
        if state is None:
            continue
        other = theirs.get(state.tuple)
        if other is None:
            result.missing.append(f"fd {sock.fd} {state.tuple}: in sockrepair's checkpoint, not in criu's images")
            continue
        result.connections.append(ConnectionComparison(state.tuple, sock.fd, compare_states(state, other, apart_ms)))
    return result
