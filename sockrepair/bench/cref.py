"""The C reference (sockrepair/bench/reference/repair_cycle.c): compiled with the system compiler when the benchmark runs,
run inside a throwaway network namespace in each of its variants, its raw samples turned into result entries:

- impl "c": the minimal cycle, queue buffers malloc'd at every checkpoint (cold), every size and batch; the
  reference of older runs;
- impl "c-warm" (`--warm`): the same cycle with its queue buffers kept and touched before timing, the sizes above
  0 B (at 0 B there is no buffer, and a batch's queues are empty);
- impl "c-options" (`--options`, like-for-like): also reads and sets the application socket options the engine
  keeps; 0 B and the batches, where those calls are a visible part of the cycle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.bench.results import (
    C_IMPL,
    C_OPTIONS_IMPL,
    C_WARM_IMPL,
    SINGLE_BLOCK,
    Batch,
    Single,
    batch_from_samples,
    single_from_samples,
)
from sockrepair.errors import BenchmarkError
from sockrepair.netns import NetNS

SOURCE = Path(__file__).parent / "reference" / "repair_cycle.c"
COMPILERS = ("cc", "gcc", "clang")
PART = "cref"  # the .part of the BenchmarkErrors of a C reference that could not be built or did not finish
NO_COMPILER_NOTE = "no C compiler (cc, gcc or clang) found: the C reference was skipped (apt-get install gcc)"


@dataclass(frozen=True)
class Variant:
    """One way of running the reference: its impl name, its switches, and what it measures."""

    impl: str
    flags: tuple[str, ...]
    empty_queues: bool  # the 0 B size
    full_queues: bool  # the sizes above 0 B
    batches: bool

    def sizes(self, sizes: Sequence[int]) -> list[int]:
        return [q for q in sizes if (self.empty_queues if q == 0 else self.full_queues)]


MINIMAL = Variant(C_IMPL, (), empty_queues=True, full_queues=True, batches=True)
WARM = Variant(C_WARM_IMPL, ("--warm",), empty_queues=False, full_queues=True, batches=False)
OPTIONS = Variant(C_OPTIONS_IMPL, ("--options",), empty_queues=True, full_queues=False, batches=True)
VARIANTS = (MINIMAL, WARM, OPTIONS)


def build(out_dir: Path, notes: list[str] | None = None, shared: bool = False) -> Path | None:
    """The compiled reference in out_dir, or None (with a note appended to `notes`) when there is no compiler. With
    `shared`, a shared library instead of the program, for a process that calls its repair_cycle_once()
    (sockrepair/bench/independent.py)."""
    compiler = next((found for name in COMPILERS if (found := shutil.which(name))), None)
    if compiler is None:
        if notes is not None:
            notes.append(NO_COMPILER_NOTE)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / ("librepair_cycle.so" if shared else "repair_cycle")
    flags = ["-shared", "-fPIC"] if shared else []
    done = subprocess.run([compiler, "-O2", "-Wall", *flags, "-o", str(binary), str(SOURCE)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
        raise BenchmarkError(f"building the C reference with {compiler} failed: {first}", part=PART)
    return binary


def argv(binary: Path, sizes: Sequence[int], reps: int, batches: Sequence[int], batch_reps: int = 3,
         flags: Sequence[str] = ()) -> list[str]:
    """Single mode in blocks of SINGLE_BLOCK cycles of one size, as sockrepair's bench runs its own."""
    return [str(binary), "--sizes", ",".join(map(str, sizes)), "--reps", str(reps), "--block", str(SINGLE_BLOCK),
            "--batches", ",".join(map(str, batches)), "--batch-reps", str(batch_reps), *flags]


def run(binary: Path, sizes: Sequence[int], reps: int, batches: Sequence[int], batch_reps: int = 3,
        timeout: float | None = None, variants: Sequence[Variant] = VARIANTS) -> dict[str, Any]:
    """Runs each variant in turn, each in a fresh network namespace (nothing touches the host's loopback), on the
    sizes and batches it measures, and returns {"single": [Single], "batch": [Batch]} of their impls. Entries whose
    bytes did not all arrive come back with verified False and the reason in "error". `timeout` is per variant."""
    out: dict[str, Any] = {"single": [], "batch": []}
    for variant in variants:
        mine, my_batches = variant.sizes(sizes), list(batches) if variant.batches else []
        if mine or my_batches:
            part = _run_variant(binary, variant, mine, reps, my_batches, batch_reps, timeout)
            out["single"] += part["single"]
            out["batch"] += part["batch"]
    return out


def _run_variant(binary: Path, variant: Variant, sizes: Sequence[int], reps: int, batches: Sequence[int],
                 batch_reps: int, timeout: float | None) -> dict[str, Any]:
    with NetNS() as ns:
        try:
            done = subprocess.run(ns.exec_argv(argv(binary, sizes, reps, batches, batch_reps, variant.flags)),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"the C reference ({variant.impl}) did not finish within {timeout:g} s",
                                 part=PART) from None
    # exit 1 means some entry was not verified: the JSON says which, and the report shows it
    if done.returncode not in (0, 1):
        why = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit status {done.returncode}"
        raise BenchmarkError(f"the C reference failed: {why}", part=PART)
    try:
        raw = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"the C reference printed no valid JSON ({exc.msg} at char {exc.pos})",
                             part=PART) from None
    return parse(raw)


def parse(raw: dict[str, Any]) -> dict[str, Any]:
    """The reference's JSON (samples in ns) as result entries (microseconds, batch times in seconds), of the impl
    it names ("c", "c-warm", "c-options")."""
    impl, block = raw["impl"], raw.get("block") or None  # 0 or absent: sizes interleaved rep by rep
    single: list[Single] = []
    for entry in raw["single"]:
        verified, error = entry["verified"], entry.get("error")
        held = min(entry["inq_bytes_min"], entry["outq_bytes_min"])
        if verified and entry["reps"] and held < entry["queue_bytes"]:
            # a cycle over emptier queues than asked would flatter the figure: it does not count
            verified, error = False, f"a queue held only {held} of {entry['queue_bytes']} bytes at checkpoint"
        samples = {phase: [ns / 1000 for ns in values] for phase, values in entry["samples_ns"].items()}
        single.append(single_from_samples(impl, entry["queue_bytes"], samples, verified, error, block=block))
    batch: list[Batch] = [
        batch_from_samples(
            impl,
            entry["connections"],
            {phase: [ns / 1e9 for ns in values] for phase, values in entry["samples_ns"].items()},
            entry["verified"],
            with_lock=False,
            error=entry.get("error"),
        )
        for entry in raw["batch"]
    ]
    return {"single": single, "batch": batch}
