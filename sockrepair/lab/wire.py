"""What the wire saw during a migration: a background recorder on one interface of a network namespace, a parser
(scapy) from frames to TCP segments, and the checks over one connection: no RST/SYN/FIN, every byte of each
direction seen (retransmissions allowed), and the gap around the freeze.

One clock throughout: CLOCK_REALTIME as float seconds, i.e. time.time(). Frames carry the kernel's receive
timestamp (SO_TIMESTAMPNS), which is that clock, and pcap files store it; freeze/resume are time.time() values."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sockrepair.engine._ffi import lib
from sockrepair.errors import WireError
from sockrepair.netns import named
from sockrepair.private import open_private
from sockrepair.state import ConnTuple

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_SO_TIMESTAMPNS = 35  # asm-generic/socket.h SO_TIMESTAMPNS_OLD: a struct timespec; Python 3.11 lacks the name
_SNAPLEN = 65535
_RCVBUF = 8 << 20
_TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}
_SEQ_MOD = 1 << 32


@dataclass(frozen=True)
class Frame:
    """One captured link-layer frame and its kernel timestamp (time.time() clock)."""

    ts: float
    data: bytes


@dataclass(frozen=True)
class Segment:
    """One TCP segment as the wire carried it. `length` counts payload bytes only."""

    ts: float
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    seq: int
    ack: int
    flags: int
    length: int

    def has(self, flag: str) -> bool:
        return bool(self.flags & _TCP_FLAGS[flag])

    @property
    def flag_text(self) -> str:
        return "".join(name for name, bit in _TCP_FLAGS.items() if self.flags & bit) or "."


# -- capture --------------------------------------------------------------------------------------------------------


class Recorder:
    """Capture every frame on `ifname` inside namespace `netns` (an `ip netns` name; None: the current one).

    `with Recorder("eth0", lab.peer.name) as rec:` ... then `rec.frames`. start() returns once the capture socket
    is bound, so nothing sent after it is missed; stop() drains what the kernel still holds."""

    def __init__(self, ifname: str, netns: str | None = None) -> None:
        self.ifname = ifname
        self.netns = netns
        self.frames: list[Frame] = []
        self._parsed: tuple[int, list[Segment]] | None = None
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Recorder:
        if self._sock is not None:
            raise WireError("recorder already running")
        self._sock = self._open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"wire-{self.ifname}", daemon=True)
        self._thread.start()
        return self

    def _open(self) -> socket.socket:
        # an AF_PACKET socket belongs to the namespace it was made in, whatever thread reads it later
        try:
            with named(self.netns):
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, lib.SO_RCVBUFFORCE, _RCVBUF)
                    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                    sock.bind((self.ifname, _ETH_P_ALL))
                except BaseException:
                    sock.close()
                    raise
        except OSError as exc:
            where = f" in namespace {self.netns}" if self.netns else ""
            raise WireError(f"cannot capture on {self.ifname}{where}: {exc.strerror or exc}") from None
        sock.settimeout(0.05)
        return sock

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            self._read_one()
        self._sock.setblocking(False)
        while self._read_one():
            pass

    def _read_one(self) -> bool:
        assert self._sock is not None
        try:
            data, anc, _, _ = self._sock.recvmsg(_SNAPLEN, socket.CMSG_SPACE(16))
        except (TimeoutError, BlockingIOError):
            return False
        ts = 0.0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", payload[:16])
                ts = sec + nsec / 1e9
        self.frames.append(Frame(ts, data))
        return True

    def stop(self) -> list[Frame]:
        """Stop capturing; returns every frame seen. `dropped` counts frames the kernel could not queue."""
        if self._sock is None:
            return self.frames
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        stats = self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        self.dropped += struct.unpack("II", stats)[1]
        self._sock.close()
        self._sock = None
        return self.frames

    def segments(self) -> list[Segment]:
        """Parsed once per capture: dissecting frames is the slow part of a report, and one capture usually
        serves a report per connection."""
        if self._parsed is None or self._parsed[0] != len(self.frames):
            self._parsed = (len(self.frames), parse_frames(self.frames))
        return self._parsed[1]

    def write_pcap(self, path: str | Path) -> None:
        write_pcap(path, self.frames)

    def report(self, conn: ConnTuple, freeze: float | None = None, resume: float | None = None,
               allow_fin: bool = False) -> WireReport:
        return analyse(self.segments(), conn, freeze, resume, allow_fin=allow_fin, capture_drops=self.dropped)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- pcap files -----------------------------------------------------------------------------------------------------

_PCAP_NS_MAGIC = 0xA1B23C4D
_LINKTYPE_ETHERNET = 1


def write_pcap(path: str | Path, frames: Sequence[Frame]) -> None:
    """A nanosecond pcap of `frames`, mode 0600 (it holds payload bytes)."""
    try:
        f = open_private(path)
    except OSError as exc:
        raise WireError(f"cannot write {path}: {exc.strerror}") from None
    with f:
        f.write(struct.pack("<IHHiIII", _PCAP_NS_MAGIC, 2, 4, 0, 0, _SNAPLEN, _LINKTYPE_ETHERNET))
        for frame in frames:
            ns = round(frame.ts * 1e9)
            f.write(struct.pack("<IIII", ns // 10**9, ns % 10**9, len(frame.data), len(frame.data)))
            f.write(frame.data)


def read_segments(path: str | Path) -> list[Segment]:
    """The TCP segments of a pcap or pcapng file (any link type scapy knows, e.g. tcpdump -i any)."""
    from scapy.error import Scapy_Exception
    from scapy.utils import rdpcap

    _load_layers()

    try:
        packets = rdpcap(str(path))
    except FileNotFoundError:
        raise WireError(f"no capture file {path}") from None
    except (OSError, Scapy_Exception) as exc:
        raise WireError(f"cannot read capture {path}: {exc}") from None
    return [seg for pkt in packets if (seg := _segment(pkt, float(pkt.time))) is not None]


def parse_frames(frames: Iterable[Frame]) -> list[Segment]:
    from scapy.layers.l2 import Ether

    _load_layers()
    return [seg for frame in frames if (seg := _segment(Ether(frame.data), frame.ts)) is not None]


def _load_layers() -> None:
    """Import every layer before the first dissection: scapy binds IP/IPv6 under Ether only when their modules are
    imported, and a frame dissected earlier stays Ether/Raw (the first frame of a run was silently lost that way)."""
    from scapy.layers import inet, inet6, l2  # noqa: F401


def _segment(pkt: Any, ts: float) -> Segment | None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Padding

    if TCP not in pkt:
        return None
    if IP in pkt:
        net = pkt[IP]
    elif IPv6 in pkt:
        net = pkt[IPv6]
    else:
        return None
    tcp = pkt[TCP]
    length = len(tcp.payload) - (len(pkt[Padding]) if Padding in pkt else 0)
    return Segment(ts, str(net.src), int(tcp.sport), str(net.dst), int(tcp.dport), int(tcp.seq), int(tcp.ack),
                   int(tcp.flags), length)


# -- analysis -------------------------------------------------------------------------------------------------------


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
    for before, after in zip(times, times[1:], strict=False):
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
            if s > pos:
                r.holes.append((pos, s))
            pos = max(pos, e)
        if hi > pos:
            r.holes.append((pos, hi))


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
    gap = report.wire_gap
    if gap is not None:
        shown = f"{gap.seconds * 1e3:.3f} ms" if gap.seconds is not None else "not measurable"
        lines.append(f"  wire gap around the migration: {shown}")
    if report.capture_drops:
        lines.append(f"  capture drops: {report.capture_drops}")
    lines.extend(f"  problem: {p}" for p in report.problems)
    return "\n".join(lines)
