"""Batches through a running program: the K live connections of a plain echo program moved in one
sockrepair.migrate() call, lock included, K = 1, 100, 1,000, 10,000; connections per second over the downtime
(freeze to unlock).

    python -m sockrepair.bench.bench_batch [--quick] [--json OUT]

The engine's own batch figures (checkpoint and restore of sockets this process holds, sockrepair/bench/bench_engine.py)
leave out what moving a program adds: freezing it, finding its sockets in /proc, taking them with pidfd_getfd, and
killing it. This measures the whole move, with the setup of the peer-gap benchmark (sockrepair/bench/bench_gap.py): a
ping-pong client in another process holds the other ends, the restored sockets go to a receiver over a UNIX socket,
and a run is verified when every connection echoes checked bytes after the move. Entries are of impl
`sockrepair-process`, with the lock; their phases are migrate()'s, in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.bench import bench_gap
from sockrepair.bench.results import SOCKREPAIR_IMPL, Batch, batch_from_samples
from sockrepair.lab.subjects import raise_fd_limit

IMPL = "sockrepair-process"
BATCHES = (1, 100, 1000, 10000)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...]
    reps: int


QUICK = Plan((1, 100), 1)
FULL = Plan(BATCHES, 3)
MOVE = bench_gap.Plan({}, settle_s=0.05, after_s=0.05)


def run(quick: bool = False, progress: Progress | None = None, batches: Sequence[int] | None = None) -> dict[str, Any]:
    """{"batch": [Batch], "notes": []}: every size `reps` times, sizes interleaved."""
    say = progress or (lambda _text: None)
    plan = QUICK if quick else FULL
    sizes = list(batches or plan.batches)
    raise_fd_limit()
    samples: dict[int, dict[str, list[float]]] = {k: {} for k in sizes}
    errors: dict[int, str] = {}
    total = plan.reps * len(sizes)
    for rep in range(plan.reps):
        for i, k in enumerate(sizes):
            say(f"batch {rep * len(sizes) + i + 1}/{total}: move a program's {k:,} connections")
            outcome = bench_gap.run_once(SOCKREPAIR_IMPL, k, MOVE, None)
            if outcome.error is not None or outcome.downtime_ms is None:
                errors.setdefault(k, outcome.error or "no downtime reported")
                say(f"    FAILED: {errors[k]}")
                continue
            for name, ms in outcome.phases_ms.items():
                if name != "handoff":
                    samples[k].setdefault(name, []).append(ms / 1000)
            say(f"    {k / outcome.downtime_ms * 1000:,.0f} conn/s ({outcome.downtime_ms:.1f} ms)")
    entries: list[Batch] = []
    for k in sizes:
        runs = samples[k]
        counts = {len(v) for v in runs.values()}
        if len(counts) > 1:  # a phase missing from some run: keep the runs that have all of them
            runs = {name: v[-min(counts):] for name, v in runs.items()}
        entries.append(batch_from_samples(IMPL, k, runs, k not in errors, with_lock=True, error=errors.get(k)))
    return {"batch": entries, "notes": []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 100 connections, one run each")
    parser.add_argument("--batches", default="", help="batch sizes (comma list; default: the plan's)")
    parser.add_argument("--json", metavar="OUT", help="also write the entries here")
    args = parser.parse_args()
    sizes = [int(v) for v in args.batches.split(",") if v] or None
    out = run(args.quick, lambda text: print(text, file=sys.stderr, flush=True), sizes)
    for e in out["batch"]:
        rate = "—" if math.isnan(e["conn_per_s"]) else f"{e['conn_per_s']:,.0f} conn/s"
        state = "" if e["verified"] else f"  NOT VERIFIED: {e['error']}"
        print(f"{e['connections']:>6} {rate}{state}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(e["verified"] for e in out["batch"]) else 1


if __name__ == "__main__":
    sys.exit(main())
