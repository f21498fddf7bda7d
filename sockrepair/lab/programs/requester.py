"""The peers of a migration that see it as users would: N independent request/response clients with random
(Poisson) arrivals, each request's latency recorded; or N connections streaming in both directions, the longest
pause in what comes back recorded. One process, one epoll loop, no sockrepair (standard library only, plus
sockrepair/lab/pattern.py loaded by path, as lab/programs/client.py does):

    requester.py --addr A --port P --connections N [--mode requests|stream] [--size B] [--interval S]
                 [--timeout S] [--max-seconds S] [--seed K]

It opens N connections (one checked request on each), prints "ready" (or "failed"), then sends:
- `requests`: on each connection, a request of --size bytes at Poisson arrivals of mean --interval seconds,
  independently of the other connections. Like most request/response protocols (HTTP/1.1, database clients), a
  connection carries one request at a time: a request due while the previous one is unanswered waits for that
  answer, then goes out. A request's latency runs from the moment it was due to the moment its whole echo was in,
  so the wait behind a slow answer, a late send (a busy loop) or a full socket buffer counts too.
- `stream`: on each connection, --size bytes every --interval seconds (the phase random per connection), while the
  echo streams back; the pause of a connection is the longest time between two receptions of its echo.
Every connection carries the checkable stream pattern(offset, salt=connection number) and the echo is compared with
it byte for byte, so a lost, repeated or misrouted byte is an error at a known offset. A line "stop" on stdin (or
--max-seconds) stops new sends; every answer outstanding is awaited (at most --timeout seconds), then one more request
goes out on every connection and is awaited (the sweep: every connection works after the move; checked, not timed),
and one JSON line is printed: mode, requests (answered and timed), bytes_verified, errors, swept, median_s,
worst [due, seconds], over_200ms (requests that took 200 ms or more), histogram (counts per upper bound in HISTOGRAM_MS, the last one
unbounded), slow (every request over SLOW_S as [due, seconds, connection number], at most MAX_SLOW), pauses
(stream: every pause over SLOW_S as [start, seconds, connection number]), longest_pause [start, seconds], interval_s, and ports (each connection's local port).
Times are CLOCK_MONOTONIC seconds, the caller's time.monotonic()."""

from __future__ import annotations

import argparse
import bisect
import collections
import heapq
import importlib.util
import json
import random
import resource
import select
import socket
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

SLOW_S = 0.001
MAX_SLOW = 20000
RTO_S = 0.2  # the shortest retransmission timeout (TCP_RTO_MIN): a request this slow waited for one
HISTOGRAM_MS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def _load_pattern() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_lab_pattern", Path(__file__).resolve().parents[1] / "pattern.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_pattern = _load_pattern()


class Conn:
    """One connection: what was sent and received of its stream, and the requests awaiting their echo."""

    def __init__(self, number: int, sock: socket.socket) -> None:
        self.number, self.sock = number, sock
        self.sent = 0  # stream offset of the next byte to queue
        self.pending = bytearray()  # queued, not yet accepted by the socket
        self.received = 0
        self.waiting: collections.deque[tuple[int, float]] = collections.deque()  # (end offset, due time)
        self.backlog: collections.deque[float] = collections.deque()  # due times of requests not yet sent
        self.last_rx: float | None = None

    def queue(self, size: int, due: float) -> None:
        self.pending += _pattern.pattern(self.sent, size, salt=self.number)
        self.sent += size
        self.waiting.append((self.sent, due))

    def flush(self) -> bool:
        """Sends what the socket takes; True when everything queued went out."""
        while self.pending:
            try:
                n = self.sock.send(self.pending)
            except BlockingIOError:
                return False
            del self.pending[:n]
        return True


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.conns: list[Conn] = []
        self.latencies: list[float] = []
        self.slow: list[tuple[float, float, int]] = []
        self.worst = (0.0, 0.0)
        self.pauses: list[tuple[float, float, int]] = []
        self.longest_pause = (0.0, 0.0)
        self.verified = 0
        self.ep = select.epoll()
        self.by_fd: dict[int, Conn] = {}
        self.timing = False  # the setup's requests are checked, not timed

    def connect(self) -> None:
        for i in range(self.args.connections):
            sock = socket.create_connection((self.args.addr, self.args.port), timeout=self.args.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = Conn(i, sock)
            self.conns.append(conn)
            self.by_fd[sock.fileno()] = conn
            self.ep.register(sock.fileno(), select.EPOLLIN)
        self.sweep()
        self.timing = True

    def send(self, conn: Conn, due: float) -> None:
        conn.queue(self.args.size, due)
        if not conn.flush():
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def on_event(self, fd: int, events: int) -> None:
        conn = self.by_fd[fd]
        if events & select.EPOLLOUT and conn.flush():
            self.ep.modify(fd, select.EPOLLIN)
        if not events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
            return
        try:
            data = conn.sock.recv(1 << 16)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError(f"connection {conn.number}: the service closed it (EOF)")
        now = time.monotonic()
        want = _pattern.pattern(conn.received, len(data), salt=conn.number)
        at = _pattern.first_mismatch(data, want)
        if at is not None or conn.received + len(data) > conn.sent:
            at = len(data) if at is None else at
            raise ValueError(f"connection {conn.number}: wrong byte at stream offset {conn.received + at}")
        conn.received += len(data)
        self.verified += len(data)
        if self.timing and conn.last_rx is not None and self.args.mode == "stream":
            pause = now - conn.last_rx
            if pause > self.longest_pause[1]:
                self.longest_pause = (conn.last_rx, pause)
            if pause > SLOW_S and len(self.pauses) < MAX_SLOW:
                self.pauses.append((conn.last_rx, pause, conn.number))
        conn.last_rx = now
        while conn.waiting and conn.waiting[0][0] <= conn.received:
            _, due = conn.waiting.popleft()
            if self.timing:
                self.record(due, now - due, conn.number)
        if conn.backlog and not conn.waiting:
            self.send(conn, conn.backlog.popleft())

    def record(self, due: float, took: float, number: int) -> None:
        self.latencies.append(took)
        if took > self.worst[1]:
            self.worst = (due, took)
        if took > SLOW_S and len(self.slow) < MAX_SLOW:
            self.slow.append((due, took, number))

    def poll(self, timeout: float) -> None:
        for fd, events in self.ep.poll(max(0.0, timeout)):
            self.on_event(fd, events)

    def drain(self) -> None:
        """Waits for every answer outstanding, at most --timeout seconds."""
        deadline = time.monotonic() + self.args.timeout
        while any(c.waiting or c.backlog for c in self.conns):
            left = deadline - time.monotonic()
            if left <= 0:
                late = sum(1 for c in self.conns if c.waiting or c.backlog)
                raise TimeoutError(f"{late} connection(s) unanswered within {self.args.timeout:g} s")
            self.poll(min(left, 1.0))

    def sweep(self) -> None:
        now = time.monotonic()
        for conn in self.conns:
            self.send(conn, now)
        self.drain()

    def run(self, stdin: select.poll) -> None:
        """Sends on schedule until "stop" (or --max-seconds), then drains and sweeps."""
        start = time.monotonic()
        end = start + self.args.max_seconds
        if self.args.mode == "requests":
            due = [(start + self.rng.expovariate(1 / self.args.interval), i) for i in range(len(self.conns))]
        else:
            due = [(start + self.rng.uniform(0, self.args.interval), i) for i in range(len(self.conns))]
        heapq.heapify(due)
        while not (stdin.poll(0) and sys.stdin.readline().strip() in ("stop", "")):
            now = time.monotonic()
            if now > end:
                raise TimeoutError(f"no stop within {self.args.max_seconds:g} s")
            while due and due[0][0] <= now:
                when, i = heapq.heappop(due)
                conn = self.conns[i]
                if self.args.mode == "stream":
                    if not conn.pending:  # a stalled stream waits for room rather than piling up
                        self.send(conn, when)
                        conn.waiting.clear()  # a stream is timed by its pauses, not by requests
                    heapq.heappush(due, (max(when + self.args.interval, now), i))
                else:
                    if conn.waiting or conn.backlog:
                        conn.backlog.append(when)  # one request at a time: it goes out with the answer
                    else:
                        self.send(conn, when)
                    heapq.heappush(due, (when + self.rng.expovariate(1 / self.args.interval), i))
            self.poll(min(due[0][0] - time.monotonic() if due else 0.05, 0.05))
        self.drain()
        self.timing = False  # the sweep sends on every connection at once: a burst of the client's making
        self.sweep()

    def report(self, errors: list[str], swept: bool) -> dict[str, object]:
        counts = [0] * (len(HISTOGRAM_MS) + 1)
        for took in self.latencies:
            counts[bisect.bisect_left(HISTOGRAM_MS, took * 1000)] += 1
        return {
            "mode": self.args.mode, "requests": len(self.latencies), "bytes_verified": self.verified,
            "errors": errors, "swept": swept,
            "median_s": statistics.median(self.latencies) if self.latencies else None, "worst": self.worst,
            "over_200ms": sum(1 for took in self.latencies if took >= RTO_S),
            "histogram": {"bounds_ms": list(HISTOGRAM_MS), "counts": counts}, "slow": self.slow,
            "pauses": self.pauses, "longest_pause": self.longest_pause, "interval_s": self.args.interval,
            "ports": [c.sock.getsockname()[1] for c in self.conns],
        }


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    errors: list[str] = []
    peer = Peer(args)
    try:
        peer.connect()
    except (OSError, ValueError) as exc:
        errors.append(f"setup: {type(exc).__name__}: {exc}")
    print("ready" if not errors else "failed", flush=True)
    swept = False
    if not errors:
        stdin = select.poll()
        stdin.register(sys.stdin, select.POLLIN)
        try:
            peer.run(stdin)
            swept = True
        except (OSError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps(peer.report(errors, swept)), flush=True)
    for conn in peer.conns:
        conn.sock.close()
    return 0 if not errors else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--mode", choices=("requests", "stream"), default="requests")
    parser.add_argument("--size", type=int, default=64, help="bytes per request (or per stream write)")
    parser.add_argument("--interval", type=float, default=0.02,
                        help="mean seconds between a connection's requests (stream: between its writes)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for outstanding answers")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=None)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
