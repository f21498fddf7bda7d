"""The shape of a benchmark run's results, shared by every implementation measured (the C reference, sockrepair,
criu) so a report can set them side by side; and the statistics that turn raw samples into it.

Times are microseconds unless a key says otherwise. docs/benchmarks.md describes every field."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

from sockrepair.errors import SockrepairError

# Phases in cycle order; an implementation reports the ones it has (the C reference has no lock or serialize).
PHASES = ("lock", "read_state", "serialize", "close", "restore", "unlock")
C_IMPL = "c"
SOCKREPAIR_IMPL = "sockrepair"


class ResultsError(SockrepairError, ValueError):
    """A results dict (or results.json) is not of the documented shape."""


class Stat(TypedDict):
    median_us: float
    p99_us: float


class Single(TypedDict):
    """One connection through the freeze-to-resume cycle, `reps` times, with `queue_bytes` in each queue."""

    impl: str
    queue_bytes: int
    reps: int
    phases: dict[str, Stat]
    total: Stat  # statistics of the per-cycle sum of the phases, not the sum of the medians
    verified: bool
    error: NotRequired[str | None]
    samples_us: NotRequired[dict[str, list[float]]]


class Batch(TypedDict):
    """`connections` connections checkpointed together, then restored together; medians over `reps` runs."""

    impl: str
    connections: int
    with_lock: bool
    reps: int
    seconds: float
    conn_per_s: float
    phases_s: dict[str, float]
    verified: bool
    error: NotRequired[str | None]


class Lock(TypedDict):
    """Lock then unlock one connection with one method (sockrepair, nft CLI, libnftables, criu-style iptables)."""

    method: str
    reps: int
    median_us: float
    p99_us: float


class Gap(TypedDict):
    """The longest silence a ping-pong peer saw around a migration of `connections` connections."""

    impl: str
    connections: int
    runs: int
    gap_ms: float  # median over runs of each run's largest gap
    max_gap_ms: float
    verified: bool


class Results(TypedDict):
    machine: dict[str, Any]
    single: list[Single]
    batch: list[Batch]
    lock: list[Lock]
    gap: list[Gap]
    notes: list[str]


def empty(machine: Mapping[str, Any]) -> Results:
    return {"machine": dict(machine), "single": [], "batch": [], "lock": [], "gap": [], "notes": []}


def p99(samples: Sequence[float]) -> float:
    """Nearest-rank 99th percentile: with fewer than 100 samples it is the largest one."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def stat(samples_us: Sequence[float]) -> Stat:
    if not samples_us:
        raise ResultsError("no samples to summarise")
    return {"median_us": statistics.median(samples_us), "p99_us": p99(samples_us)}


def _rep_totals(samples: Mapping[str, Sequence[float]]) -> list[float]:
    lengths = {len(v) for v in samples.values()}
    if len(lengths) != 1:
        raise ResultsError(f"phases have different sample counts: {sorted(lengths)}")
    return [sum(rep) for rep in zip(*samples.values())]


def single_from_samples(impl: str, queue_bytes: int, samples_us: Mapping[str, Sequence[float]], verified: bool,
                        error: str | None = None, keep_samples: bool = True) -> Single:
    """`samples_us[phase][i]` is phase's time in cycle i; all phases have one sample per cycle."""
    phases = {name: list(samples_us[name]) for name in PHASES if name in samples_us}
    unknown = set(samples_us) - set(PHASES)
    if unknown:
        raise ResultsError(f"unknown phases {sorted(unknown)} (known: {', '.join(PHASES)})")
    reps = len(next(iter(phases.values()), []))
    entry: Single = {
        "impl": impl,
        "queue_bytes": queue_bytes,
        "reps": reps,
        "phases": {name: stat(v) for name, v in phases.items()} if reps else {},
        "total": stat(_rep_totals(phases)) if reps else {"median_us": math.nan, "p99_us": math.nan},
        "verified": verified and reps > 0,
        "error": error,
    }
    if keep_samples:
        entry["samples_us"] = phases
    return entry


def batch_from_samples(impl: str, connections: int, samples_s: Mapping[str, Sequence[float]], verified: bool,
                       with_lock: bool, error: str | None = None) -> Batch:
    """`samples_s[phase][i]` is the whole batch's time in that phase on run i, in seconds."""
    reps = len(next(iter(samples_s.values()), []))
    seconds = statistics.median(_rep_totals(samples_s)) if reps else math.nan
    return {
        "impl": impl,
        "connections": connections,
        "with_lock": with_lock,
        "reps": reps,
        "seconds": seconds,
        "conn_per_s": connections / seconds if reps and seconds > 0 else math.nan,
        "phases_s": {name: statistics.median(v) for name, v in samples_s.items()} if reps else {},
        "verified": verified and reps > 0,
        "error": error,
    }


_REQUIRED: dict[str, tuple[str, ...]] = {
    "single": ("impl", "queue_bytes", "reps", "phases", "total", "verified"),
    "batch": ("impl", "connections", "with_lock", "reps", "seconds", "conn_per_s", "verified"),
    "lock": ("method", "reps", "median_us", "p99_us"),
    "gap": ("impl", "connections", "runs", "gap_ms", "max_gap_ms", "verified"),
}


def check(data: Any) -> Results:
    """The same dict, once its shape is known to be right; a ResultsError names the first thing that is not."""
    if not isinstance(data, dict):
        raise ResultsError("results must be a JSON object")
    for key in ("machine", *_REQUIRED):
        if key not in data:
            raise ResultsError(f"results lack the {key!r} key")
    if not isinstance(data["machine"], dict):
        raise ResultsError("results 'machine' must be an object")
    for section, fields in _REQUIRED.items():
        if not isinstance(data[section], list):
            raise ResultsError(f"results {section!r} must be a list")
        for i, entry in enumerate(data[section]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise ResultsError(f"results {section}[{i}] lacks {', '.join(missing)}")
    data.setdefault("notes", [])
    return data  # type: ignore[no-any-return]
