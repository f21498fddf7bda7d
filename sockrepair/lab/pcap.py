"""Frames and TCP segments, and the pcap files that hold them: a frame is one captured link-layer frame with its
kernel timestamp, a segment one TCP segment as the wire carried it. Writing needs nothing but struct; reading and
dissecting use scapy, imported on first use only (`import sockrepair` must not load it).

One clock throughout: CLOCK_REALTIME as float seconds, i.e. time.time(). Frames carry the kernel's receive
timestamp (SO_TIMESTAMPNS), which is that clock, and pcap files store it with nanoseconds."""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.errors import WireError
from sockrepair.private import open_private, read_regular

SNAPLEN = 65535  # bytes of a frame kept: the largest IP packet, so no frame is cut
_TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}
_PCAP_NS_MAGIC = 0xA1B23C4D
_LINKTYPE_ETHERNET = 1


@dataclass(frozen=True)
class Frame:
    """One captured link-layer frame and its kernel timestamp (time.time() clock)."""

    ts: float
    data: bytes


@dataclass(frozen=True)
class Segment:
    """One TCP segment as the wire carried it. `length` counts payload bytes only; `window` is the raw 16-bit field,
    `ip_id` the IPv4 identification (None for IPv6), `tsval` the TCP timestamp option's TSval (RFC 7323; None without
    the option): with seq and ack they tell a copy of a segment, delivered again by sockrepair, from a segment the
    peer sent again (lab/analysis.py)."""

    ts: float
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    seq: int
    ack: int
    flags: int
    length: int
    window: int = 0
    ip_id: int | None = None
    tsval: int | None = None
    options: bytes = b""  # the TCP options as sent (SACK blocks tell duplicate ACKs apart)

    def has(self, flag: str) -> bool:
        return bool(self.flags & _TCP_FLAGS[flag])

    @property
    def flag_text(self) -> str:
        return "".join(name for name, bit in _TCP_FLAGS.items() if self.flags & bit) or "."


def write_pcap(path: str | Path, frames: Sequence[Frame]) -> None:
    """A nanosecond pcap of `frames`, mode 0600 (it holds payload bytes). Raises WireError when it cannot."""
    try:
        f = open_private(path)
    except OSError as exc:
        raise WireError(f"cannot write {path}: {exc.strerror}") from None
    with f:
        f.write(struct.pack("<IHHiIII", _PCAP_NS_MAGIC, 2, 4, 0, 0, SNAPLEN, _LINKTYPE_ETHERNET))
        for frame in frames:
            ns = round(frame.ts * 1e9)
            f.write(struct.pack("<IIII", ns // 10**9, ns % 10**9, len(frame.data), len(frame.data)))
            f.write(frame.data)


MAX_CAPTURE = 4 << 30  # bytes; rdpcap holds every packet in memory anyway


def read_segments(path: str | Path) -> list[Segment]:
    """The TCP segments of a pcap or pcapng file (any link type scapy knows, e.g. tcpdump -i any). Raises WireError
    when the file is missing or not a capture."""
    from scapy.error import Scapy_Exception
    from scapy.utils import rdpcap

    _load_layers()

    # scapy's own warnings (a truncated last record, an unknown link type) would break the one-line output; what
    # could not be read shows as segments missing from the analysis
    runtime = logging.getLogger("scapy.runtime")
    level = runtime.level
    runtime.setLevel(logging.ERROR)
    try:
        # read whole first: a FIFO would block, a device never end (rdpcap loads every packet anyway)
        packets = rdpcap(io.BytesIO(read_regular(path, MAX_CAPTURE)))
    except FileNotFoundError:
        raise WireError(f"no capture file {path}") from None
    except OSError as exc:
        raise WireError(f"cannot read capture {path}: {exc.strerror}") from None
    except Scapy_Exception as exc:
        raise WireError(f"cannot read capture {path}: {exc}") from None
    finally:
        runtime.setLevel(level)
    return [seg for pkt in packets if (seg := _segment(pkt, float(pkt.time))) is not None]


def parse_frames(frames: Iterable[Frame]) -> list[Segment]:
    """The TCP segments among Ethernet `frames`, in their order; other frames are skipped."""
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
    tsval = next((int(value[0]) for name, value in tcp.options if name == "Timestamp"), None)
    options = bytes(tcp)[20 : int(tcp.dataofs) * 4] if tcp.dataofs else b""
    return Segment(ts, str(net.src), int(tcp.sport), str(net.dst), int(tcp.dport), int(tcp.seq), int(tcp.ack),
                   int(tcp.flags), length, int(tcp.window), int(net.id) if IP in pkt else None, tsval, options)
