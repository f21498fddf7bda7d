#!/usr/bin/env python3
"""The two programs of the peer-gap benchmarks, run as separate processes so that neither shares an interpreter
lock with the process doing the migration (standard library only; run by path):

    gap_programs.py client --addr A --port P --connections N [--chunk B] [--interval S] [--round-timeout S]
                           [--max-seconds S]
    gap_programs.py receiver --unix PATH [--max-seconds S]

client: opens N connections (one checked round on each), prints "ready", then runs ping-pong rounds, one connection
after the other, timing each round trip with CLOCK_MONOTONIC (the same clock as the caller's time.monotonic()).
A line "stop" on stdin (or --max-seconds) ends the rounds; it then runs one more round on every connection, so
every connection is shown to work after the migration, and prints one JSON line: rounds, bytes verified, errors,
the median round trip, and every round that took over SLOW_S as [start, seconds].

receiver: listens on the UNIX socket PATH for connections passed with SCM_RIGHTS (sockrepair.handoff.send_over_unix)
and echoes on each; prints "ready" once listening, and "took N" after each batch of sockets it was given."""

from __future__ import annotations

import argparse
import json
import resource
import select
import socket
import statistics
import sys
import time

SLOW_S = 0.001  # round trips slower than this are reported one by one; the rest only as a median
MAX_SLOW = 2000
SCM_MAX_FD = 253


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def chunk(conn: int, seq: int, size: int) -> bytes:
    """Round `seq` of connection `conn`: different on every round and connection, so a lost, repeated or misrouted
    byte shows in the echo."""
    unit = f"{conn}.{seq};".encode()
    return (unit * (size // len(unit) + 1))[:size]


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
        if got != data:
            at = next(k for k in range(len(data)) if got[k] != data[k])
            raise ValueError(f"connection {i}: wrong byte {at} of round {self.seqs[i]}")
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


def run_client(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    errors: list[str] = []
    client = None
    try:
        client = Client(args.addr, args.port, args.connections, args.chunk, args.round_timeout)
    except (OSError, ValueError) as exc:
        errors.append(f"setup: {exc}")
    print("ready" if not errors else "failed", flush=True)
    swept = False
    if client is not None:
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
        "slowest": client.slowest if client else None,
    }), flush=True)
    return 0 if not errors else 1


def run_receiver(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.unix)
    listener.listen(8)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    owned: dict[int, socket.socket] = {listener.fileno(): listener}
    feeders: set[int] = set()
    print("ready", flush=True)
    end = time.monotonic() + args.max_seconds
    while time.monotonic() < end:
        for fd, _ in ep.poll(1.0):
            sock = owned.get(fd)
            if sock is None:
                continue
            if sock is listener:
                feeder, _ = listener.accept()
                owned[feeder.fileno()] = feeder
                feeders.add(feeder.fileno())
                ep.register(feeder.fileno(), select.EPOLLIN)
            elif fd in feeders:
                _, fds, _, _ = socket.recv_fds(sock, 1 << 16, SCM_MAX_FD)
                for new in fds:
                    conn = socket.socket(fileno=new)
                    conn.setblocking(True)
                    owned[new] = conn
                    ep.register(new, select.EPOLLIN)
                if fds:
                    print(f"took {len(fds)}", flush=True)
                else:
                    ep.unregister(fd)
                    feeders.discard(fd)
                    owned.pop(fd).close()
            else:
                try:
                    data = sock.recv(1 << 16)
                    if data:
                        sock.sendall(data)
                        continue
                except OSError:
                    pass
                ep.unregister(fd)
                owned.pop(fd).close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    c = sub.add_parser("client")
    c.add_argument("--addr", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--connections", type=int, default=1)
    c.add_argument("--chunk", type=int, default=64)
    c.add_argument("--interval", type=float, default=0.0, help="pause between rounds, seconds")
    c.add_argument("--round-timeout", type=float, default=60.0)
    c.add_argument("--max-seconds", type=float, default=600.0)
    r = sub.add_parser("receiver")
    r.add_argument("--unix", required=True)
    r.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long whatever happens")
    args = parser.parse_args()
    return run_client(args) if args.role == "client" else run_receiver(args)


if __name__ == "__main__":
    sys.exit(main())
