"""The peer of a migration: a ping-pong client in its own process, so that it shares no interpreter lock with the
process doing the migration. Standard library only, plus sockrepair/lab/pattern.py loaded by path (importing it as
sockrepair.lab.pattern would bring the whole package, engine included, into a program that must stay plain):

    client.py --addr A --port P --connections N [--chunk B] [--interval S] [--round-timeout S] [--max-seconds S]

It opens N connections (one checked round on each), prints "ready" (or "failed"), then runs ping-pong rounds, one
connection after the other, timing each round trip with CLOCK_MONOTONIC (the same clock as the caller's
time.monotonic()). Each connection carries the checkable stream pattern(offset, salt=connection number), so a lost,
repeated or misrouted byte shows in the echo at a known offset. A line "stop" on stdin (or --max-seconds) ends the
rounds; it then runs one more round on every connection, so every connection is shown to work after the migration,
and prints one JSON line: rounds (timed ones), bytes verified, errors, whether that last sweep passed, the median
round trip, the slowest round as [start, seconds], every round that took over SLOW_S as [start, seconds], and the
local port of each connection."""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import select
import socket
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

SLOW_S = 0.001  # round trips slower than this are reported one by one; the rest only as a median
MAX_SLOW = 2000


def _load_pattern() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_lab_pattern", Path(__file__).resolve().parents[1] / "pattern.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_pattern = _load_pattern()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def chunk(conn: int, seq: int, size: int) -> bytes:
    """Round `seq` of connection `conn` (every round of a connection has the same size): its slice of the
    connection's stream, different on every round and connection."""
    return bytes(_pattern.pattern(seq * size, size, salt=conn))


class Client:
    def __init__(self, addr: str, port: int, count: int, size: int, round_timeout: float) -> None:
        self.size, self.round_timeout = size, round_timeout
        self.socks: list[socket.socket] = []
        self.seqs = [0] * count
        self.rtts: list[float] = []
        self.slow: list[tuple[float, float]] = []
        self.slowest = (0.0, 0.0)
        self.verified = 0
        for i in range(count):
            sock = socket.create_connection((addr, port), timeout=round_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(sock)
            self.round(i, timed=False)

    def round(self, i: int, timed: bool = True) -> None:
        data = chunk(i, self.seqs[i], self.size)
        sock = self.socks[i]
        start = time.monotonic()
        sock.sendall(data)
        got = bytearray()
        # poll, not select: select() cannot watch fds >= 1024, which a client with many connections reaches
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        deadline = start + self.round_timeout
        while len(got) < len(data):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError(f"connection {i}: no echo within {self.round_timeout:g} s "
                                   f"({len(got)} of {len(data)} bytes)")
            piece = sock.recv(len(data) - len(got))
            if not piece:
                raise ConnectionError(f"connection {i}: the service closed it (EOF)")
            got += piece
        took = time.monotonic() - start
        at = _pattern.first_mismatch(bytes(got), data)
        if at is not None:
            raise ValueError(f"connection {i}: wrong byte {at} of round {self.seqs[i]} "
                             f"(stream offset {self.seqs[i] * self.size + at})")
        self.seqs[i] += 1
        self.verified += len(data)
        if timed:
            self.rtts.append(took)
            if took > self.slowest[1]:
                self.slowest = (start, took)
            if took > SLOW_S and len(self.slow) < MAX_SLOW:
                self.slow.append((start, took))


def _stop_requested(poller: select.poll) -> bool:
    if not poller.poll(0):
        return False
    return sys.stdin.readline().strip() in ("stop", "")


def run(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    errors: list[str] = []
    client = None
    try:
        client = Client(args.addr, args.port, args.connections, args.chunk, args.round_timeout)
    except (OSError, ValueError) as exc:
        errors.append(f"setup: {exc}")
    print("ready" if not errors else "failed", flush=True)
    swept = False
    ports: list[int] = []
    if client is not None:
        ports = [s.getsockname()[1] for s in client.socks]
        stdin = select.poll()
        stdin.register(sys.stdin, select.POLLIN)
        end = time.monotonic() + args.max_seconds
        n = 0
        try:
            while not _stop_requested(stdin):
                if time.monotonic() > end:
                    errors.append(f"no stop within {args.max_seconds:g} s")
                    break
                client.round(n % len(client.socks))
                n += 1
                if args.interval:
                    time.sleep(args.interval)
            for i in range(len(client.socks)):
                client.round(i)
            swept = True
        except (OSError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        for sock in client.socks:
            sock.close()
    rtts = client.rtts if client else []
    print(json.dumps({
        "rounds": len(rtts), "bytes_verified": client.verified if client else 0, "errors": errors, "swept": swept,
        "median_rtt_s": statistics.median(rtts) if rtts else None, "slow": client.slow if client else [],
        "slowest": client.slowest if client else None, "ports": ports,
    }), flush=True)
    return 0 if not errors else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=64, help="bytes per round")
    parser.add_argument("--interval", type=float, default=0.0, help="pause between rounds, seconds")
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
