"""The C reference (sockrepair/bench/reference/repair_cycle.c): compiled with the system compiler when the benchmark runs,
run inside a throwaway network namespace, its raw samples turned into result entries of impl "c"."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sockrepair.bench.results import (
    C_IMPL,
    Batch,
    Single,
    batch_from_samples,
    single_from_samples,
)
from sockrepair.errors import SockrepairError
from sockrepair.netns import NetNS

SOURCE = Path(__file__).parent / "reference" / "repair_cycle.c"
COMPILERS = ("cc", "gcc", "clang")
NO_COMPILER_NOTE = "no C compiler (cc, gcc or clang) found: the C reference was skipped (apt-get install gcc)"


class CReferenceError(SockrepairError):
    """The C reference could not be built or did not run to the end."""


def build(out_dir: Path, notes: list[str] | None = None) -> Path | None:
    """The compiled reference in out_dir, or None (with a note appended to `notes`) when there is no compiler."""
    compiler = next((found for name in COMPILERS if (found := shutil.which(name))), None)
    if compiler is None:
        if notes is not None:
            notes.append(NO_COMPILER_NOTE)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "repair_cycle"
    done = subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
        raise CReferenceError(f"building the C reference with {compiler} failed: {first}")
    return binary


def argv(binary: Path, sizes: Sequence[int], reps: int, batches: Sequence[int], batch_reps: int = 3,
         warm_buffers: bool = False) -> list[str]:
    args = [str(binary), "--sizes", ",".join(map(str, sizes)), "--reps", str(reps),
            "--batches", ",".join(map(str, batches)), "--batch-reps", str(batch_reps)]
    return [*args, "--warm-buffers"] if warm_buffers else args


def run(binary: Path, sizes: Sequence[int], reps: int, batches: Sequence[int], batch_reps: int = 3,
        warm_buffers: bool = False, timeout: float | None = None) -> dict[str, Any]:
    """Runs the reference in a fresh network namespace (nothing touches the host's loopback) and returns
    {"single": [Single], "batch": [Batch]} of impl "c" ("c-warm" with warm buffers). Entries whose bytes did not
    all arrive come back with verified False and the reason in "error"."""
    with NetNS() as ns:
        try:
            done = subprocess.run(ns.exec_argv(argv(binary, sizes, reps, batches, batch_reps, warm_buffers)),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CReferenceError(f"the C reference did not finish within {timeout:g} s") from None
    # exit 1 means some entry was not verified: the JSON says which, and the report shows it
    if done.returncode not in (0, 1):
        why = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit status {done.returncode}"
        raise CReferenceError(f"the C reference failed: {why}")
    try:
        raw = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise CReferenceError(f"the C reference printed no valid JSON ({exc.msg} at char {exc.pos})") from None
    return parse(raw)


def parse(raw: dict[str, Any]) -> dict[str, Any]:
    """The reference's JSON (samples in ns) as result entries (microseconds, batch times in seconds)."""
    impl = C_IMPL if raw.get("buffers", "fresh") == "fresh" else f"{C_IMPL}-warm"
    single: list[Single] = []
    for entry in raw["single"]:
        verified, error = entry["verified"], entry.get("error")
        held = min(entry["inq_bytes_min"], entry["outq_bytes_min"])
        if verified and entry["reps"] and held < entry["queue_bytes"]:
            # a cycle over emptier queues than asked would flatter the figure: it does not count
            verified, error = False, f"a queue held only {held} of {entry['queue_bytes']} bytes at checkpoint"
        samples = {phase: [ns / 1000 for ns in values] for phase, values in entry["samples_ns"].items()}
        single.append(single_from_samples(impl, entry["queue_bytes"], samples, verified, error))
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
