"""A ping-pong client for migration experiments: it keeps several connections busy with checkable data, verifies
every echoed byte, and logs each round trip so the largest gap around a migration can be read off."""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sockrepair.lab.pattern import first_mismatch, pattern
from sockrepair.netns import named

ROUND_TIMEOUT = 10.0


@dataclass
class PingPongReport:
    connections: int
    rounds: int
    bytes_verified: int
    errors: list[str]
    max_gap_ms: float
    max_gap_at: float  # time.time() when the slowest round trip started
    median_rtt_ms: float
    local_ports: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "connections": self.connections, "rounds": self.rounds,
                "bytes_verified": self.bytes_verified, "errors": self.errors,
                "max_gap_ms": round(self.max_gap_ms, 3), "median_rtt_ms": round(self.median_rtt_ms, 3)}


class PingPong:
    """`connections` connections to addr:port, opened from inside network namespace `netns` (None: here); each
    round sends `chunk` bytes on one connection and waits for all of them to come back."""

    def __init__(self, addr: str, port: int, connections: int = 3, chunk: int = 2048, netns: str | None = None,
                 interval: float = 0.0):
        """`interval`: pause between rounds (0: back to back), to keep a wire capture small enough to analyse."""
        self.addr, self.port, self.count, self.chunk, self.netns = addr, port, connections, chunk, netns
        self.interval = interval
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pingpong", daemon=True)
        self._rtts: list[tuple[float, float]] = []
        self._errors: list[str] = []
        self._verified = 0
        self._ports: list[int] = []

    def start(self, timeout: float = 10.0) -> PingPong:
        self._thread.start()
        if not self._connected.wait(timeout) or self._errors:
            self.stop()
            raise ConnectionError(f"ping-pong client could not connect to {self.addr}:{self.port}: "
                                  f"{'; '.join(self._errors) or 'timed out'}")
        return self

    def stop(self) -> PingPongReport:
        self._stop.set()
        self._thread.join(ROUND_TIMEOUT + 5)
        rtts = sorted(r for _, r in self._rtts)
        slowest = max(self._rtts, key=lambda x: x[1], default=(0.0, 0.0))
        return PingPongReport(self.count, len(self._rtts), self._verified, self._errors, slowest[1] * 1000,
                              slowest[0], rtts[len(rtts) // 2] * 1000 if rtts else 0.0, self._ports)

    def _run(self) -> None:
        socks: list[socket.socket] = []
        try:
            with named(self.netns):
                for _ in range(self.count):
                    socks.append(socket.create_connection((self.addr, self.port), timeout=ROUND_TIMEOUT))
            self._ports = [s.getsockname()[1] for s in socks]
            self._connected.set()
            offsets = [0] * len(socks)
            n = 0
            while not self._stop.is_set():
                i = n % len(socks)
                n += 1
                data = pattern(offsets[i], self.chunk, salt=i)
                started, wall = time.monotonic(), time.time()
                socks[i].sendall(data)
                got = self._receive(socks[i], len(data))
                self._rtts.append((wall, time.monotonic() - started))
                bad = first_mismatch(got, data)
                if bad is not None:
                    self._errors.append(f"connection {i}: wrong byte at stream offset {offsets[i] + bad}")
                    return
                offsets[i] += len(data)
                self._verified += len(data)
                if self.interval:
                    self._stop.wait(self.interval)
        except (OSError, TimeoutError) as exc:
            self._errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._connected.set()
            for s in socks:
                s.close()

    @staticmethod
    def _readable(sock: socket.socket, timeout: float) -> bool:
        """poll, not select: select() cannot watch fds >= 1024, which a client with many connections reaches."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def _receive(self, sock: socket.socket, length: int) -> bytes:
        out = bytearray()
        deadline = time.monotonic() + ROUND_TIMEOUT
        while len(out) < length:
            left = deadline - time.monotonic()
            if left <= 0 or not self._readable(sock, left):
                raise TimeoutError(f"no echo for {ROUND_TIMEOUT:.0f} s ({len(out)} of {length} bytes)")
            piece = sock.recv(length - len(out))
            if not piece:
                raise ConnectionError("the service closed the connection (EOF)")
            out += piece
        return bytes(out)
