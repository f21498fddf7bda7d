"""Every benchmark of issue 6 in one run, then the report: results.json, results.md and the PNG plots.

    python -m sockrepair.bench.run_all [--quick] [--out DIR] [--json] [--parts c,engine,batch,lock,gap,crosshost]
    (or `sockrepair bench`)

Parts, in this order: the C reference (first half of its cycles), the Python engine (sockrepair/bench/bench_engine.py,
when it exists), the C reference again (second half: the ratios compare figures measured minutes apart, not an
hour); with both parts the C reference's single mode runs inside the engine part instead, a round of blocks after
each of the engine's, and only its batches run first; then batches through a running program, lock methods,
peer-seen gaps (sockrepair and criu interleaved run by run) and cross-host moves in the lab. Then every missed
target that has a profiler is profiled (sockrepair/bench/profiles.py: the engine's cycles and the move within one
host). Progress goes to stderr; a part that cannot run here is skipped with a note in the report, never replaced by
made-up numbers.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from sockrepair.bench import cref, machine, profiles, report
from sockrepair.bench.results import Results, empty, lock_entries, merge_single
from sockrepair.errors import BenchmarkError, NotPermittedError, SockrepairError

PARTS = ("c", "engine", "batch", "lock", "gap", "crosshost")
QUICK_C = {"reps": 10, "batch_reps": 1}
FULL_C = {"reps": 300, "batch_reps": 5}
C_SIZES = (0, 4 << 10, 64 << 10, 1 << 20, 16 << 20)
C_BATCHES = (1, 100, 1000, 10000)
C_TIMEOUT = 1200.0
ENGINE_MODULE = "sockrepair.bench.bench_engine"


class Progress:
    """Numbered lines with the elapsed time, on stderr."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {text}", file=self.stream, flush=True)


def _c_half(binary: Path, quick: bool, first: bool, singles: bool = True) -> dict[str, Any]:
    """Half the cycles of every size (none without `singles`: the engine part runs them round by round between its
    own); the batches only in the first half (their medians do not merge)."""
    plan = QUICK_C if quick else FULL_C
    reps = max(1, plan["reps"] // 2)
    return cref.run(binary, C_SIZES if singles else (), reps, C_BATCHES if first else (), plan["batch_reps"],
                    timeout=C_TIMEOUT)


def engine_module() -> Any | None:
    """sockrepair/bench/bench_engine.py when it is there (another part of the project writes it)."""
    if importlib.util.find_spec(ENGINE_MODULE) is None:
        return None
    return importlib.import_module(ENGINE_MODULE)


def _part(name: str, results: Results, say: Progress, work: Callable[[], None]) -> None:
    started = time.monotonic()
    say(f"== {name}")
    try:
        work()
    except (SockrepairError, OSError) as exc:
        results["notes"].append(f"{name} did not complete: {exc}")
        say(f"   {name} FAILED: {exc}")
        return
    say(f"   {name} done in {time.monotonic() - started:.1f} s")


def _refuse(parts: Sequence[str]) -> None:
    """NotPermittedError without root, SockrepairError for an unknown part: before anything is made."""
    if os.geteuid() != 0:
        raise NotPermittedError("the benchmarks need root (CAP_NET_ADMIN): each part runs in network namespaces "
                                "it creates and deletes")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SockrepairError(f"unknown part(s) {', '.join(sorted(unknown))} (parts: {', '.join(PARTS)})")


def run(quick: bool = False, parts: Sequence[str] = PARTS, progress: Progress | None = None,
        profile_missed: bool = True) -> Results:
    say = progress or Progress()
    _refuse(parts)
    say("recording the machine")
    results = empty(machine.describe())
    if quick:
        results["notes"].append("quick run (`--quick`): a smoke test of the harness, with few cycles; its figures "
                                "are rough")
    with tempfile.TemporaryDirectory(prefix="sockrepair-bench-") as tmp:
        binary = None
        if "c" in parts:
            say("building the C reference")
            try:
                binary = cref.build(Path(tmp), results["notes"])
            except BenchmarkError as exc:
                results["notes"].append(f"C reference skipped: {exc}")
        c_single: list[Any] = []
        module = engine_module() if "engine" in parts else None
        # with the engine part, the C reference's single mode runs inside it, round by round between the engine's
        c_in_engine = binary is not None and module is not None

        def c_run(first: bool) -> None:
            out = _c_half(binary, quick, first, singles=not c_in_engine)  # type: ignore[arg-type]
            c_single.extend(out["single"])
            results["batch"].extend(out["batch"])

        if binary is not None:
            _part("C reference, batches (its single mode runs round by round inside the engine part)" if c_in_engine
                  else "C reference, first half of the cycles, and batches", results, say, lambda: c_run(True))
        if "engine" in parts:
            if module is None:
                results["notes"].append("sockrepair/bench/bench_engine.py is missing: the Python engine's single-"
                                        "connection and batch figures were not measured")
                say("   the engine benchmark (sockrepair/bench/bench_engine.py) is missing: skipped")
            else:
                def engine() -> None:
                    out = module.run(quick, c_binary=binary if c_in_engine else None)
                    c_single.extend(out.get("c_single", []))
                    results["single"].extend(out.get("single", []))
                    results["batch"].extend(out.get("batch", []))
                    results.setdefault("independent", []).extend(out.get("independent", []))
                    results.setdefault("syscalls", []).extend(out.get("syscalls", []))
                    results["notes"].extend(out.get("notes", []))
                _part("Python engine: one connection by phase, and batches", results, say, engine)
        if binary is not None and not c_in_engine:
            _part("C reference, second half of the cycles", results, say, lambda: c_run(False))
        results["single"].extend(merge_single(c_single))
    if "batch" in parts:
        from sockrepair.bench import bench_batch

        _part("batches through a running program", results, say,
              lambda: _merge(results, bench_batch.run(quick, say)))
    if "lock" in parts:
        from sockrepair.bench import bench_lock

        _part("lock methods", results, say,
              lambda: results["lock"].extend(lock_entries(bench_lock.run(quick)["cases"])))
    if "gap" in parts:
        from sockrepair.bench import bench_gap

        _part("peer-seen gap: sockrepair vs criu", results, say, lambda: _merge(results, bench_gap.run(quick, say)))
    if "crosshost" in parts:
        _part("cross-host migration in the lab", results, say, lambda: _crosshost(results, quick, say))
    if profile_missed:
        keys = report.missed(results)
        if keys:
            _part("profiles of the missed targets", results, say,
                  lambda: results["profiles"].update(profiles.profile_missed(keys, quick, say)))
    return results


def _merge(results: Results, out: dict[str, Any]) -> None:
    for key in ("single", "batch", "lock", "gap", "notes"):
        results[key].extend(out.get(key, []))


def _crosshost(results: Results, quick: bool, say: Progress) -> None:
    try:
        from sockrepair.bench import bench_crosshost
    except ImportError as exc:  # the lab or the wire recorder is not there yet
        results["notes"].append(f"cross-host part skipped: {exc}")
        return
    _merge(results, bench_crosshost.run(quick, say))


def incomplete(results: Results) -> list[str]:
    """Every entry that ran but did not verify its bytes, as text."""
    bad = [f"{section} {e.get('impl', e.get('method'))} {e.get('queue_bytes', e.get('connections', ''))}: "
           f"{e.get('error')}" for section in ("single", "batch", "gap") for e in results[section]
           if not e["verified"]]
    return bad


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # unwinds the with-blocks: namespaces, nft tables and helper processes are removed as on Ctrl-C
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None, prog: str = "python -m sockrepair.bench.run_all") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smoke test of the harness, under two minutes")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for the report "
                        "(default: ./bench-out)")
    parser.add_argument("--json", action="store_true", help="also print results.json on stdout")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--no-profiles", action="store_true", help="do not profile the missed targets")


def run_from_args(args: argparse.Namespace) -> int:
    parts = [p for p in args.parts.split(",") if p]
    _refuse(parts)  # before --out is made: a refused run leaves nothing behind
    # an --out that cannot hold the report fails now (an OSError: one `sockrepair: error:` line), not after the
    # minutes of measuring it would have held
    args.out.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        say = Progress()
        results = run(args.quick, parts, say, not args.no_profiles)
        written = report.write(results, args.out)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for path in written:
        say(f"wrote {path}")
    for note in results["notes"]:
        say(f"note: {note}")
    if args.json:
        print((args.out / "results.json").read_text(), end="")
    bad = incomplete(results)
    for line in bad:
        say(f"NOT VERIFIED: {line}")
    return 0 if not bad else 2


if __name__ == "__main__":
    sys.exit(main())
