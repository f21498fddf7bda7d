"""Where the time goes when a target is missed: the phase behind it run again under cProfile, in a network
namespace made for it, and the functions that took the most time listed per cycle.

Targets and what is profiled (keys are the report's target texts):
- one connection, 0 B or 1 MiB (and the image's share at 1 MiB): checkpoint, serialize, silent close, deserialize and
  restore of a loopback connection holding that many bytes in its receive queue (the send queue stays empty: filling
  it needs the peer's window closed);
- lock + unlock: one connection locked and unlocked with one Locker;
- 10,000 connections with the lock: 1,000 connections locked, checkpointed (checkpoint_many, as the benchmark),
  serialized, closed, restored, unlocked;
- peer-seen gap: sockrepair.migrate() of the echo program with that many connections (sockrepair/bench/bench_gap.py).
"""

from __future__ import annotations

import cProfile
import functools
import os
import pstats
import re
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from sockrepair import checkpoint, discard, restore
from sockrepair.bench.results import GAP_TARGETS_MS, SOCKREPAIR_IMPL, Profile, ProfileRow
from sockrepair.engine._batch import checkpoint_many
from sockrepair.errors import SockrepairError
from sockrepair.lock import Locker
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState, ConnTuple

TOP = 12
LOOPBACK = "127.0.0.1"


def rows(profiler: cProfile.Profile, cycles: int, top: int = TOP) -> list[ProfileRow]:
    """The `top` functions by own time, per cycle."""
    stats = pstats.Stats(profiler)
    table = stats.stats  # type: ignore[attr-defined]
    ordered = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    out: list[ProfileRow] = []
    for (path, line, name), (_, calls, own, cumulative, _) in ordered:
        # built-ins are named like "<function socket.close at 0x7f...>": the address only differs between runs
        where = f"{os.path.basename(path)}:{line}({name})" if path != "~" else re.sub(r" at 0x[0-9a-f]+", "", name)
        out.append({"function": where, "calls": calls, "own_ms": own * 1000 / cycles,
                    "cumulative_ms": cumulative * 1000 / cycles})
    return out


def _abort(sock: socket.socket) -> None:
    """Close with RST: no TIME_WAIT left holding loopback ports."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextmanager
def _pairs(count: int, queue_bytes: int = 0) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """`count` loopback connections (moving end, peer end), each moving end with `queue_bytes` unread."""
    made: list[tuple[socket.socket, socket.socket]] = []
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(min(count, 4096))
        try:
            for _ in range(count):
                sock = socket.socket()
                if queue_bytes:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * queue_bytes)
                sock.connect(listener.getsockname())
                peer, _ = listener.accept()
                made.append((sock, peer))
                if queue_bytes:
                    peer.sendall(b"q" * queue_bytes)
            yield made
        finally:
            for sock, peer in made:
                for s in (sock, peer):
                    if s.fileno() >= 0:
                        _abort(s)


def _tuple(sock: socket.socket) -> ConnTuple:
    return ConnTuple(socket.AF_INET, *sock.getsockname(), *sock.getpeername())


def single_cycle(queue_bytes: int, cycles: int) -> Profile:
    profiler = cProfile.Profile()
    with NetNS() as ns, ns.entered():
        for _ in range(cycles):
            with _pairs(1, queue_bytes) as pairs:
                sock, peer = pairs[0]
                profiler.enable()
                state = checkpoint(sock)
                image = state.to_bytes()
                discard(sock, state)
                restored = restore(ConnectionState.from_bytes(image))
                profiler.disable()
                pairs[0] = (restored, peer)
    return {"what": f"checkpoint, serialize, close, deserialize, restore; {queue_bytes} B in the receive queue",
            "cycles": cycles, "rows": rows(profiler, cycles)}


def lock_cycle(cycles: int) -> Profile:
    profiler = cProfile.Profile()
    one = ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 5000)
    with NetNS() as ns, ns.entered(), Locker(label="bench-profile") as locker:
        locker.lock([one])
        locker.unlock([one])
        profiler.enable()
        for _ in range(cycles):
            locker.lock([one])
            locker.unlock([one])
        profiler.disable()
    return {"what": "lock then unlock one connection", "cycles": cycles, "rows": rows(profiler, cycles)}


def batch_cycle(count: int) -> Profile:
    profiler = cProfile.Profile()
    with NetNS() as ns, ns.entered(), Locker(label="bench-profile") as locker, _pairs(count) as pairs:
        tuples = [_tuple(sock) for sock, _ in pairs]
        profiler.enable()
        locker.lock(tuples)
        states = checkpoint_many([sock for sock, _ in pairs])
        for state in states:
            state.to_bytes()
        for (sock, _), state in zip(pairs, states):
            discard(sock, state)
        restored = [restore(state) for state in states]
        locker.unlock(tuples)
        profiler.disable()
        pairs[:] = [(new, peer) for new, (_, peer) in zip(restored, pairs)]
    return {"what": f"{count:,} connections: lock, checkpoint, serialize, close, restore, unlock", "cycles": 1,
            "rows": rows(profiler, 1)}


def gap_move(connections: int) -> Profile:
    from sockrepair.bench import bench_gap

    profiler = cProfile.Profile()
    plan = bench_gap.Plan({}, settle_s=0.05, after_s=0.05)
    outcome = bench_gap.run_once(SOCKREPAIR_IMPL, connections, plan, None, profiler)
    what = (f"the whole sockrepair.migrate() call for a program holding {connections:,} connections: the lock "
            "tables built before the freeze and the lock sockets closed after it included, with the handoff")
    if outcome.error:
        what += f" (the run failed: {outcome.error})"
    return {"what": what, "cycles": 1, "rows": rows(profiler, 1)}


def for_target(key: str, quick: bool) -> Callable[[], Profile] | None:
    """The profiler for a target of benchmarks.report.TARGETS (by its `key`), or None when there is none."""
    few = 3 if quick else 30
    table: dict[str, Callable[[], Profile]] = {
        "single-0": lambda: single_cycle(0, few),
        "single-0-options": lambda: single_cycle(0, few),
        "single-1MiB": lambda: single_cycle(1 << 20, max(1, few // 3)),
        "image-1MiB": lambda: single_cycle(1 << 20, max(1, few // 3)),
        "lock": lambda: lock_cycle(100 if quick else 1000),
        "batch-10000": lambda: batch_cycle(100 if quick else 1000),
        **{f"gap-{n}": functools.partial(gap_move, n) for n in GAP_TARGETS_MS},
    }
    return table.get(key)


def profile_missed(keys: Sequence[str], quick: bool, say: Callable[[str], None]) -> dict[str, Profile]:
    out: dict[str, Profile] = {}
    for key in keys:
        make = for_target(key, quick)
        if make is None:
            continue
        say(f"profiling the phase behind missed target {key}")
        try:
            out[key] = make()
        except (OSError, ValueError, SockrepairError) as exc:
            out[key] = {"what": f"profiling failed: {exc}", "cycles": 0, "rows": []}
    return out
