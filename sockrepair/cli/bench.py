"""`sockrepair bench`: the benchmarks of sockrepair.bench.run_all behind the command line. They draw plots with
matplotlib, the `bench` extra; without it the command says which extra to install."""

from __future__ import annotations

import argparse
from pathlib import Path

from sockrepair.cli.args import path_arg
from sockrepair.errors import UnsupportedError

EXTRA = "pip install 'sockrepair[bench]'"
# run_all.PARTS, which this module cannot import before it knows matplotlib is there; a unit test holds them equal
PARTS = ("c", "engine", "batch", "lock", "gap", "crosshost")


def parts_arg(text: str) -> str:
    unknown = sorted({p for p in text.split(",") if p} - set(PARTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)} (parts: {', '.join(PARTS)})")
    return text


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from sockrepair.bench.run_all import run_from_args
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "matplotlib":
            raise
        raise UnsupportedError(f"sockrepair bench needs matplotlib for its plots: {EXTRA}") from None
    return run_from_args(args)


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("bench", help="measure freeze-to-resume latency, batches, locks and peer gaps "
                              "(root); writes results.json, results.md and plots")
    p.add_argument("--quick", action="store_true", help="a smoke test of the harness, under two minutes")
    p.add_argument("--out", type=path_arg, default=Path("bench-out"), help="directory for the report (default: "
                   "./bench-out)")
    p.add_argument("--json", action="store_true", help="also print results.json on stdout")
    p.add_argument("--parts", type=parts_arg, default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--no-profiles", action="store_true", help="do not profile the phases of missed targets")
    p.set_defaults(func=cmd_bench)
