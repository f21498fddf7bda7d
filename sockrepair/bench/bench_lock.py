"""Network lock benchmark: sockrepair's netlink lock against the ways criu and nft users lock today.

    python sockrepair/bench/bench_lock.py [--quick] [--json OUT]

Runs inside a network namespace it creates (root needed). Cases: sockrepair lock+unlock of one connection (one
long-lived socket); 10,000 connections locked and unlocked; and, when installed, the `nft` CLI, iptables the way
criu runs it (2 rules per connection, each an iptables run), and libnftables in process (context reused, and new
per call as criu does). Each case reports median and p99 of one lock+unlock (or one batch) in microseconds.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from sockrepair.lock import Locker
from sockrepair.netns import NetNS
from sockrepair.state import ConnTuple

ONE = ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 5000)
NFT_ELEMENT = "10.0.0.1 . 40000 . 10.0.0.2 . 5000"
NFT_TABLE = """
table inet nftbench {
    set conn4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; }
    chain input { type filter hook input priority -300; ip saddr . tcp sport . ip daddr . tcp dport @conn4 drop; }
    chain output { type filter hook output priority -300; ip saddr . tcp sport . ip daddr . tcp dport @conn4 drop; }
}
"""


def _stats(samples_ns: list[int]) -> dict[str, Any]:
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(ordered), "median_us": statistics.median(ordered) / 1000, "p99_us": p99 / 1000}


def _time(fn: Callable[[], None], runs: int, warmup: int = 1) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return _stats(samples)


def _many(count: int) -> list[ConnTuple]:
    return [
        ConnTuple(socket.AF_INET, f"10.1.{i // 250}.{i % 250 + 1}", 1024 + i % 60000, "10.2.0.1", 443)
        for i in range(count)
    ]


def bench_sockrepair(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Locker(label="bench") as locker:

        def one() -> None:
            locker.lock([ONE])
            locker.unlock([ONE])

        out["sockrepair lock+unlock, 1 connection"] = _time(one, 300 if quick else 3000, warmup=5)
        conns = _many(10000)
        lock_ns, unlock_ns = [], []
        for _ in range(3 if quick else 10):
            start = time.perf_counter_ns()
            locker.lock(conns)
            mid = time.perf_counter_ns()
            locker.unlock(conns)
            unlock_ns.append(time.perf_counter_ns() - mid)
            lock_ns.append(mid - start)
        out["sockrepair lock 10,000 connections"] = _stats(lock_ns)
        out["sockrepair unlock 10,000 connections"] = _stats(unlock_ns)
        locker.unlock_all()
    return out


def bench_nft_cli(quick: bool) -> dict[str, Any]:
    nft = shutil.which("nft")
    if nft is None:
        return {}
    subprocess.run([nft, "-f", "-"], input=NFT_TABLE, text=True, check=True)

    def one() -> None:
        subprocess.run([nft, f"add element inet nftbench conn4 {{ {NFT_ELEMENT} timeout 60s }}"], check=True)
        subprocess.run([nft, f"delete element inet nftbench conn4 {{ {NFT_ELEMENT} }}"], check=True)

    try:
        return {"nft CLI lock+unlock, 1 connection": _time(one, 10 if quick else 50)}
    finally:
        subprocess.run([nft, "delete table inet nftbench"], check=True)


def bench_iptables(quick: bool) -> dict[str, Any]:
    """criu's lock: per connection, a DROP rule in INPUT and one in OUTPUT, each its own iptables run (criu adds a
    `sh -c` around each; not here, so this is a lower bound of its cost)."""
    ipt = shutil.which("iptables")
    if ipt is None:
        return {}
    match = ["-p", "tcp", "-s", ONE.local_addr, "--sport", str(ONE.local_port), "-d", ONE.remote_addr,
             "--dport", str(ONE.remote_port), "-j", "DROP"]  # fmt: skip

    def one() -> None:
        for action in ("-I", "-D"):
            for chain in ("INPUT", "OUTPUT"):
                subprocess.run([ipt, "-w", "-t", "filter", action, chain, *match], check=True)

    version = subprocess.run([ipt, "--version"], capture_output=True, text=True).stdout.strip()
    try:
        return {f"iptables x4 as criu runs it ({version})": _time(one, 5 if quick else 30)}
    finally:
        subprocess.run([ipt, "-t", "filter", "-F"], check=True)


def bench_libnftables(quick: bool) -> dict[str, Any]:
    path = ctypes.util.find_library("nftables")
    if path is None:
        return {}
    lib = ctypes.CDLL(path)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    add = f"add element inet nftbench conn4 {{ {NFT_ELEMENT} timeout 60s }}".encode()
    delete = f"delete element inet nftbench conn4 {{ {NFT_ELEMENT} }}".encode()

    def run(ctx: int, cmd: bytes) -> None:
        if lib.nft_run_cmd_from_buffer(ctx, cmd) != 0:
            raise RuntimeError(f"libnftables refused {cmd.decode()!r}")

    ctx = lib.nft_ctx_new(0)
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)
    run(ctx, NFT_TABLE.encode())

    def reused() -> None:
        run(ctx, add)
        run(ctx, delete)

    def fresh() -> None:
        for cmd in (add, delete):
            c = lib.nft_ctx_new(0)
            lib.nft_ctx_buffer_output(c)
            lib.nft_ctx_buffer_error(c)
            try:
                run(c, cmd)
            finally:
                lib.nft_ctx_free(c)

    try:
        return {
            "libnftables lock+unlock, context reused": _time(reused, 100 if quick else 1000, warmup=3),
            "libnftables lock+unlock, new context per call (criu)": _time(fresh, 10 if quick else 50),
        }
    finally:
        run(ctx, b"delete table inet nftbench")
        lib.nft_ctx_free(ctx)


def run(quick: bool = False) -> dict[str, Any]:
    """Every case, in a throwaway network namespace; returns {"environment": ..., "cases": {name: stats}}."""
    cases: dict[str, Any] = {}
    with NetNS() as ns, ns.entered():
        for bench in (bench_sockrepair, bench_nft_cli, bench_iptables, bench_libnftables):
            cases.update(bench(quick))
    return {
        "environment": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "quick": quick,
        },
        "cases": cases,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this file")
    args = parser.parse_args()
    result = run(args.quick)
    width = max(len(name) for name in result["cases"])
    print(f"{'case'.ljust(width)}  {'median':>12}  {'p99':>12}  runs")
    for name, st in result["cases"].items():
        print(f"{name.ljust(width)}  {st['median_us']:>10.1f}us  {st['p99_us']:>10.1f}us  {st['n']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
