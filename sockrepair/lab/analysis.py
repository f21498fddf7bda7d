"""The checks over one connection in a list of TCP segments: no RST/SYN/FIN, every byte of each direction seen
(retransmissions allowed), the longest silences, the wire gap around a freeze, and the segments sockrepair's lock
kept and delivered (seen twice: before the lock dropped them and when they were delivered); `format_report` is the
text `sockrepair verify` prints. Pure computation on Segments (lab/pcap.py), no capture and no scapy.

Times are time.time() values (CLOCK_REALTIME seconds), the clock of the captured frames."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from sockrepair.lab.pcap import Segment
from sockrepair.state import ConnTuple

_SEQ_MOD = 1 << 32


@dataclass
class Silence:
    """The longest stretch between two consecutive segments of one direction (or of the connection)."""

    seconds: float
    after: float
    before: float


@dataclass
class WireGap:
    """Last segment of the connection at or before the freeze, first at or after the resume."""

    last_before: float | None
    first_after: float | None
    seconds: float | None


@dataclass
class DirectionReport:
    """One direction of the connection, named `SRC->DST`."""

    name: str
    segments: int = 0
    data_segments: int = 0
    bytes: int = 0  # distinct sequence space covered by data
    retransmitted_bytes: int = 0  # data bytes seen again (retransmissions, overlaps)
    out_of_order: int = 0  # data segments that started beyond everything seen so far
    rst: int = 0
    syn: int = 0
    fin: int = 0
    holes: list[tuple[int, int]] = field(default_factory=list)  # [start, end) relative to the first seq, never seen
    largest_silence: Silence | None = None
    # segments seen a second time as exact copies: kept by sockrepair's lock and delivered to the restored socket
    # (docs/keeping.md), not sent again by the peer; each one's delay after the original, in seconds
    delivered: int = 0
    delivered_delays: list[float] = field(default_factory=list)


@dataclass
class WireReport:
    """The verdict on one connection: `ok` when `problems` is empty."""

    tuple: str
    ok: bool
    problems: list[str]
    directions: list[DirectionReport]
    wire_gap: WireGap | None
    largest_silence: Silence | None
    segments: int
    capture_drops: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _same_addr(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def _direction(seg: Segment, conn: ConnTuple) -> int | None:
    """0 when `seg` goes local->remote of `conn`, 1 when remote->local, None when it is another connection."""
    if seg.src_port == conn.local_port and seg.dst_port == conn.remote_port and _same_addr(
            seg.src_addr, conn.local_addr) and _same_addr(seg.dst_addr, conn.remote_addr):
        return 0
    if seg.src_port == conn.remote_port and seg.dst_port == conn.local_port and _same_addr(
            seg.src_addr, conn.remote_addr) and _same_addr(seg.dst_addr, conn.local_addr):
        return 1
    return None


def _signed(delta: int) -> int:
    delta %= _SEQ_MOD
    return delta - _SEQ_MOD if delta >= _SEQ_MOD // 2 else delta


def _largest_silence(times: Sequence[float]) -> Silence | None:
    best: Silence | None = None
    for before, after in pairwise(times):
        if best is None or after - before > best.seconds:
            best = Silence(after - before, before, after)
    return best


class _Stream:
    """Sequence bookkeeping of one direction, in offsets from the first segment's sequence number, unwrapped
    across 2^32 by always stepping from the last position seen."""

    def __init__(self, report: DirectionReport) -> None:
        self.report = report
        self.last_seq: int | None = None
        self.pos = 0  # offset of last_seq
        self.covered: list[tuple[int, int]] = []  # merged, sorted [start, end) ranges seen
        self.claimed = 0  # a segment with sequence number S means every byte before S was sent
        # the first segment captured had neither payload nor SYN, FIN or RST: when it is a window probe (criu's
        # restore sends one) it carries snd_una - 1, a byte acknowledged before the capture began
        self.bare_first: bool | None = None
        self.seen: dict[tuple[object, ...], float] = {}  # identity of each segment -> when it was first seen

    def offset(self, seq: int) -> int:
        if self.last_seq is None:
            self.last_seq, self.pos = seq, 0
        else:
            self.pos += _signed(seq - self.last_seq)
            self.last_seq = seq
        return self.pos

    def add(self, seg: Segment) -> None:
        r = self.report
        r.segments += 1
        identity = _identity(seg)
        if identity is not None:
            first = self.seen.get(identity)
            if first is not None:
                r.delivered += 1
                r.delivered_delays.append(seg.ts - first)
                return
            self.seen[identity] = seg.ts
        start = self.offset(seg.seq)
        if seg.has("S"):
            r.syn += 1
            start += 1  # the SYN takes one sequence number; data begins after it
            self.covered = _merge(self.covered, (start - 1, start))
        if seg.has("R"):
            r.rst += 1
        if seg.has("F"):
            r.fin += 1
        end = start + seg.length + (1 if seg.has("F") else 0)
        if self.bare_first is None:
            self.bare_first = end == start and not seg.has("R")
        if seg.length:
            r.data_segments += 1
            if self.covered and start > self.covered[-1][1]:
                r.out_of_order += 1
            r.retransmitted_bytes += _overlap(self.covered, (start, start + seg.length))
        if end > start:
            self.covered = _merge(self.covered, (start, end))
        if not seg.has("R"):
            # an RST's sequence number need not follow the stream; any other segment's does
            self.claimed = max(self.claimed, start)

    def finish(self) -> None:
        r = self.report
        hi = max([self.claimed, *(e for _, e in self.covered)])
        r.bytes = sum(e - s for s, e in self.covered)
        # bytes before the first segment captured were sent before the capture began: holes count from offset 0
        pos = 0
        for s, e in self.covered:
            # the one byte below the first data, when a bare segment came first: that probe's byte, not a loss
            if s > pos and not (pos == 0 and s == 1 and self.bare_first):
                r.holes.append((pos, s))
            pos = max(pos, e)
        if hi > pos:
            r.holes.append((pos, hi))


def _identity(seg: Segment) -> tuple[object, ...] | None:
    """What makes a segment the very one the peer sent: a copy that sockrepair's lock kept and delivered (from a raw
    socket, marked SOCCR_MARK: lock/inject.py) repeats every field, while the peer's own retransmission carries a new
    IPv4 identification and a new TSval. None when the segment has neither (IPv6 without TCP timestamps): a
    retransmission could not be told from a copy."""
    if seg.ip_id is None and seg.tsval is None:
        return None
    return (seg.seq, seg.ack, seg.flags, seg.length, seg.window, seg.ip_id, seg.tsval, seg.options)


def _overlap(covered: list[tuple[int, int]], rng: tuple[int, int]) -> int:
    return sum(max(0, min(e, rng[1]) - max(s, rng[0])) for s, e in covered)


def _merge(covered: list[tuple[int, int]], rng: tuple[int, int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    start, end = rng
    for s, e in covered:
        if e < start or s > end:
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    out.append((start, end))
    out.sort()
    return out


def analyse(segments: Iterable[Segment], conn: ConnTuple, freeze: float | None = None, resume: float | None = None,
            *, allow_fin: bool = False, capture_drops: int = 0) -> WireReport:
    """Check one connection in `segments` (in capture order). `conn` may be given from either side; freeze and
    resume (time.time() values) ask for the wire gap around them."""
    conn = conn.wire()
    streams = [_Stream(DirectionReport(str(conn))), _Stream(DirectionReport(str(conn.reversed())))]
    times: list[list[float]] = [[], []]
    mine: list[Segment] = []
    for seg in segments:
        d = _direction(seg, conn)
        if d is None:
            continue
        mine.append(seg)
        streams[d].add(seg)
        times[d].append(seg.ts)
    problems: list[str] = []
    if capture_drops:
        problems.append(f"the capture dropped {capture_drops} frame(s): the checks cannot see everything")
    if not mine:
        problems.append(f"no segment of {conn} in the capture")
    for stream, ts in zip(streams, times, strict=True):
        stream.finish()
        r = stream.report
        r.largest_silence = _largest_silence(ts)
        if r.rst:
            problems.append(f"{r.name}: {r.rst} RST")
        if r.syn:
            problems.append(f"{r.name}: {r.syn} SYN")
        if r.fin and not allow_fin:
            problems.append(f"{r.name}: {r.fin} FIN")
        for s, e in r.holes:
            problems.append(f"{r.name}: bytes {s}..{e} (relative) never seen on the wire")
    gap = _wire_gap(mine, freeze, resume) if freeze is not None or resume is not None else None
    if gap is not None and gap.first_after is None and mine:
        problems.append("no segment of the connection after the resume")
    return WireReport(
        tuple=str(conn),
        ok=not problems,
        problems=problems,
        directions=[s.report for s in streams],
        wire_gap=gap,
        largest_silence=_largest_silence(sorted(s.ts for s in mine)),
        segments=len(mine),
        capture_drops=capture_drops,
    )


def _wire_gap(segments: Sequence[Segment], freeze: float | None, resume: float | None) -> WireGap:
    freeze = resume if freeze is None else freeze
    resume = freeze if resume is None else resume
    assert freeze is not None and resume is not None
    before = [s.ts for s in segments if s.ts <= freeze]
    after = [s.ts for s in segments if s.ts >= resume]
    last = max(before) if before else None
    first = min(after) if after else None
    return WireGap(last, first, first - last if first is not None and last is not None else None)


def format_report(report: WireReport) -> str:
    """The human-readable form `sockrepair verify` prints."""
    lines = [f"connection {report.tuple}: {'ok' if report.ok else 'NOT OK'} ({report.segments} segments)"]
    for d in report.directions:
        silence = f", longest silence {d.largest_silence.seconds * 1e3:.3f} ms" if d.largest_silence else ""
        lines.append(f"  {d.name}: {d.segments} segments, {d.data_segments} with data, {d.bytes} bytes, "
                     f"{d.retransmitted_bytes} retransmitted, {d.out_of_order} out of order, "
                     f"RST {d.rst} SYN {d.syn} FIN {d.fin}{silence}")
        if d.delivered:
            lines.append(f"    {d.delivered} kept and delivered by sockrepair (copies, not retransmissions), "
                         f"delayed {min(d.delivered_delays) * 1e3:.3f}..{max(d.delivered_delays) * 1e3:.3f} ms")
    gap = report.wire_gap
    if gap is not None:
        shown = f"{gap.seconds * 1e3:.3f} ms" if gap.seconds is not None else "not measurable"
        lines.append(f"  wire gap around the migration: {shown}")
    if report.capture_drops:
        lines.append(f"  capture drops: {report.capture_drops}")
    lines.extend(f"  problem: {p}" for p in report.problems)
    return "\n".join(lines)
