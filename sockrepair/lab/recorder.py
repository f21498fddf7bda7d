"""A background recorder of every frame on one interface of a network namespace (an AF_PACKET socket read by a
thread), with the kernel's receive timestamps (SO_TIMESTAMPNS: time.time() clock) and the count of frames the
kernel dropped; the frames go to a pcap (lab/pcap.py) or straight into the checks (lab/analysis.py)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

from sockrepair.engine._ffi import lib
from sockrepair.errors import WireError
from sockrepair.lab.analysis import WireReport, analyse
from sockrepair.lab.pcap import SNAPLEN, Frame, Segment, parse_frames, write_pcap
from sockrepair.netns import named
from sockrepair.state import ConnTuple

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_SO_TIMESTAMPNS = 35  # asm-generic/socket.h SO_TIMESTAMPNS_OLD: a struct timespec; Python 3.11 lacks the name
# frames wait here while the reading thread is off the CPU: criu's retransmission bursts after a second-long move of
# 1,000 streaming connections overflowed 8 MiB by 52,811 frames (some 2.3 KiB of buffer each); committed only as used
_RCVBUF = 256 << 20
_ARPHRD_LOOPBACK = 772  # linux/if_arp.h


def wall_clock(monotonic: float) -> float:
    """The time.time() of the instant that time.monotonic() gave as `monotonic` (seconds), for comparing it with
    the frames' stamps (MigrationReport.frozen_at, say)."""
    return time.time() - (time.monotonic() - monotonic)


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
            data, anc, _, addr = self._sock.recvmsg(SNAPLEN, socket.CMSG_SPACE(16))
        except (TimeoutError, BlockingIOError):
            return False
        if addr[3] == _ARPHRD_LOOPBACK and addr[2] == socket.PACKET_OUTGOING:
            # a loopback device shows each packet twice, leaving and arriving: one is kept, as libpcap does
            return True
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
