"""`sockrepair bench`: the benchmarks of sockrepair/bench/run_all.py behind the command line. The benchmarks live in the
repository's benchmarks/ directory next to this package; from a checkout (editable install) it is put on the
import path when it is not importable already."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from sockrepair.errors import UnsupportedError

CHECKOUT = Path(__file__).resolve().parent.parent


def _benchmarks_importable() -> None:
    if importlib.util.find_spec("sockrepair.bench") is not None:
        return
    if (CHECKOUT / "sockrepair.bench" / "run_all.py").is_file():
        sys.path.insert(0, str(CHECKOUT))
        return
    raise UnsupportedError("the benchmarks are not installed: run `sockrepair bench` from a checkout of the "
                           "repository (pip install -e .)")


def cmd_bench(args: argparse.Namespace) -> int:
    _benchmarks_importable()
    from sockrepair.bench.run_all import run_from_args

    return run_from_args(args)


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("bench", help="measure freeze-to-resume latency, batches, locks and peer gaps "
                              "(root); writes results.json, results.md and plots")
    p.add_argument("--quick", action="store_true", help="a smoke test of the harness, under two minutes")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for the report (default: "
                   "./bench-out)")
    p.add_argument("--json", action="store_true", help="also print results.json on stdout")
    p.add_argument("--parts", default="c,engine,batch,lock,gap,crosshost",
                   help="comma list of c, engine, batch, lock, gap, crosshost")
    p.add_argument("--no-profiles", action="store_true", help="do not profile the phases of missed targets")
    p.set_defaults(func=cmd_bench)
