"""A run's results as files: results.json, results.md (tables with ratios to the C reference measured in the same
run, and the targets of issues 6, 11 and 13 marked met or missed, by how much, and where the time goes, with the
independent check's ratio beside the bench's) and the PNG plots.

The C reference comes in variants (sockrepair/bench/cref.py): 0 B is judged against the minimal C and against the
like-for-like C (the same socket options as the engine), queue sizes against the warm C (buffers reused, the
physical limit); the cold C stays in the tables as information. A saved run from before the variants has only the
cold C: its tables show that one ratio, and the targets that need another variant read "not measured".

    python -m sockrepair.bench.report results.json --out DIR     # redraw the report of a saved run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.bench.plots import write_plots
from sockrepair.bench.results import (
    BATCH_TARGET,
    C_IMPL,
    C_IMPLS,
    C_OPTIONS_IMPL,
    C_WARM_IMPL,
    CROSSHOST_IMPL,
    GAP_TARGETS_MS,
    PHASES,
    SOCKREPAIR_IMPL,
    Batch,
    Gap,
    Independent,
    Results,
    Single,
    Syscalls,
    check,
    workload,
)
from sockrepair.bench.units import connections, human_bytes, human_us
from sockrepair.errors import BenchmarkError, SockrepairError
from sockrepair.lab.programs.requester import RTO_S


@dataclass(frozen=True)
class Measured:
    value: float
    where: str  # where the time goes, for a missed target; "" when there is nothing to say


@dataclass(frozen=True)
class Target:
    key: str  # names the target in results["profiles"] and in sockrepair/bench/profiles.py
    text: str
    limit: float
    unit: str
    higher_is_better: bool
    measure: Callable[[Results], Measured | None]
    issues: str  # the issues that set it
    # (C variant, queue bytes) of the independent check that judges the same ratio, when one does
    check: tuple[str, int] | None = None


def _single(results: Results, impl: str, queue: int) -> Single | None:
    return next((e for e in results["single"] if e["impl"] == impl and e["queue_bytes"] == queue), None)


# each variant of the C reference as the report names it, and the heading of its ratio column
C_NAMES = {C_IMPL: "minimal C", C_WARM_IMPL: "warm C", C_OPTIONS_IMPL: "like-for-like C"}
C_COLUMNS = {C_IMPL: "x C", C_WARM_IMPL: "x C warm", C_OPTIONS_IMPL: "x C options"}


def _slowest_phase(entry: Single, ref: Single | None) -> str:
    """Every phase of the cycle, the largest first, with its share and the C variant's figure where it has one."""
    phases = entry["phases"]
    parts = []
    for name in sorted(phases, key=lambda p: -phases[p]["median_us"]):
        share = phases[name]["median_us"] / entry["total"]["median_us"]
        part = f"{name} {human_us(phases[name]['median_us'])} ({share:.0%} of the cycle)"
        if ref is not None and name in ref["phases"]:
            part += f", {C_NAMES.get(ref['impl'], ref['impl'])} {human_us(ref['phases'][name]['median_us'])}"
        parts.append(part)
    return "; ".join(parts)


def _calls_text(entry: Syscalls) -> str:
    return f"{entry['total']} ({', '.join(f'{name} {n}' for name, n in entry['calls'].items())})"


def syscalls_where(results: Results, c_impl: str, queue: int) -> str:
    """System calls per cycle at `queue` (sockrepair/bench/syscalls.py): sockrepair's, and the C variant's when it
    was traced; "" when the run did not count them."""
    counted = {(e["impl"], e["queue_bytes"]): e for e in results.get("syscalls") or []}
    ours, ref = counted.get((SOCKREPAIR_IMPL, queue)), counted.get((c_impl, queue))
    if ours is None:
        return ""
    where = f"system calls per cycle: sockrepair {_calls_text(ours)}"
    if ref is not None:
        where += f", {C_NAMES.get(c_impl, c_impl)} {_calls_text(ref)}"
    return where


def _ratio_to(c_impl: str, queue: int) -> Callable[[Results], Measured | None]:
    def measure(results: Results) -> Measured | None:
        ours, ref = _single(results, SOCKREPAIR_IMPL, queue), _single(results, c_impl, queue)
        if ours is None or ref is None or not ref["total"]["median_us"]:
            return None
        where = "; ".join(w for w in (_slowest_phase(ours, ref), syscalls_where(results, c_impl, queue)) if w)
        return Measured(ours["total"]["median_us"] / ref["total"]["median_us"], where)
    return measure


def _image_share(queue: int) -> Callable[[Results], Measured | None]:
    """serialize + deserialize as a share (%) of sockrepair's whole cycle at `queue` bytes in each queue."""
    def measure(results: Results) -> Measured | None:
        ours = _single(results, SOCKREPAIR_IMPL, queue)
        if ours is None or "serialize" not in ours["phases"] or not ours["total"]["median_us"]:
            return None
        image = {p: ours["phases"][p]["median_us"] for p in ("serialize", "deserialize") if p in ours["phases"]}
        where = (", ".join(f"{p} {human_us(us)}" for p, us in image.items())
                 + f" of a {human_us(ours['total']['median_us'])} cycle")
        return Measured(100 * sum(image.values()) / ours["total"]["median_us"], where)
    return measure


def _lock(results: Results) -> Measured | None:
    entry = next((e for e in results["lock"] if e["method"] == SOCKREPAIR_IMPL), None)
    return None if entry is None else Measured(entry["median_us"], "")


def _batch(connections: int) -> Callable[[Results], Measured | None]:
    def measure(results: Results) -> Measured | None:
        entry = next((e for e in results["batch"] if e["impl"] == SOCKREPAIR_IMPL and e["with_lock"]
                      and e["connections"] == connections), None)
        if entry is None:
            return None
        return Measured(entry["conn_per_s"], batch_where(results, entry))
    return measure


def batch_where(results: Results, entry: Batch) -> str:
    """Every phase of a batch per connection, largest first, against what the 30,000 conn/s target allows per
    connection, and the C batches of the same size (they take no lock)."""
    k = entry["connections"]
    phases = entry.get("phases_s") or {}
    if not phases or not k:
        return ""
    each = ", ".join(f"{name} {human_us(seconds / k * 1e6)}"
                     for name, seconds in sorted(phases.items(), key=lambda p: -p[1]))
    where = f"per connection: {each} (of {human_us(entry['seconds'] / k * 1e6)}; 30,000/s allows 33.3 µs)"
    for impl in (C_IMPL, C_OPTIONS_IMPL):
        c = next((e for e in results["batch"] if e["impl"] == impl and e["connections"] == k), None)
        if c is not None and c["conn_per_s"]:
            where += f"; {C_NAMES[impl]} {human_us(1e6 / c['conn_per_s'])}"
    return where


def gap_where(entry: Gap) -> str:
    """The move's own time and its largest phases; what the peer waited beyond the move and the handoff."""
    where = _move_where(entry)
    if not where:
        return ""
    phases = entry.get("phases_ms") or {}
    rest = entry["gap_ms"] - entry["downtime_ms"] - phases.get("handoff", 0.0)
    if rest > 0.2 * entry["gap_ms"]:
        where += f"; {human_us(rest * 1000)} more waiting at the peer (its retransmission timer, or scheduling)"
    elif entry["gap_ms"] < entry["downtime_ms"]:
        where += ("; the worst request shorter than the move: in most runs no request was sent while it lasted "
                  f"(the worst of the runs {human_us(entry['max_gap_ms'] * 1000)})")
    return where


def _move_where(entry: Gap) -> str:
    """Freeze to unlock and its three largest phases, then the handoff; "" when the entry has no move time."""
    phases = entry.get("phases_ms") or {}
    downtime = entry.get("downtime_ms", math.nan)
    if not phases or math.isnan(downtime):
        return ""
    inside = sorted(((ms, name) for name, ms in phases.items() if name != "handoff"), reverse=True)[:3]
    where = (f"freeze to unlock {human_us(downtime * 1000)}: "
             + ", ".join(f"{name} {human_us(ms * 1000)}" for ms, name in inside))
    if "handoff" in phases:
        where += f"; handoff {human_us(phases['handoff'] * 1000)}"
    return where


def kept_where(entry: Gap) -> str:
    """What the lock kept and what it left to the peers' retransmission, and the sockets restored with output the
    peer had not acknowledged, when the entry says."""
    said = []
    if "kept_delivered" in entry:
        said.append(f"the lock kept and delivered {entry['kept_delivered']:,} packet(s), left "
                    f"{entry.get('kept_fell_back', 0):,} to the peers' retransmission")
    if entry.get("restored_unacked") and entry.get("over_200ms", 1):  # it costs nothing when no request waited
        text = (f"{entry['restored_unacked']} socket(s) restored holding output the peer had not acknowledged (an "
                "answer the lock stopped on its way out goes out again only when the restored socket's "
                "retransmission timer fires, 200 ms or more, and the requests behind it wait)")
        if "over_200ms_unacked" in entry:
            text += (f": {entry['over_200ms_unacked']} of the {entry.get('over_200ms', 0)} requests >= 200 ms were "
                     "on those connections")
        said.append(text)
    return "; ".join(said)


def _headline_entry(results: Results, connections: int, impl: str = SOCKREPAIR_IMPL) -> Gap | None:
    """The requests entry of `impl` (sockrepair's, or its cross-host one) for `connections`; in a run saved before
    the workloads, its ping-pong entry."""
    mine = [e for e in results["gap"] if e["impl"] == impl and e["connections"] == connections]
    return next((e for e in mine if workload(e) == "requests"), None) or next(
        (e for e in mine if workload(e) == "pingpong" and not any(workload(o) == "requests" for o in results["gap"])),
        None)


def _gap(connections: int, impl: str = SOCKREPAIR_IMPL) -> Callable[[Results], Measured | None]:
    def measure(results: Results) -> Measured | None:
        entry = _headline_entry(results, connections, impl)
        if entry is None:
            return None
        where = "; ".join(w for w in (gap_where(entry), kept_where(entry),
                                      _baseline_where(entry)) if w)
        if workload(entry) == "pingpong":
            where = "ping-pong round trip (a run without the requests workload); " + where
        return Measured(entry["gap_ms"], where)
    return measure


def _baseline_where(entry: Gap) -> str:
    """The worst the peer saw before the move began (the machine's noise), and of what was due after it ended (the
    move's aftermath when it is much larger: requests queued behind an answer still held back)."""
    said = [f"{when} {human_us(entry[key] * 1000)}"  # type: ignore[literal-required]
            for key, when in (("baseline_ms", "answered before the move began"),
                              ("later_ms", "due after it and its handoff ended")) if key in entry]
    return f"the worst request {', and '.join(said)}" if said else ""


def _rto(connections: int, impl: str = SOCKREPAIR_IMPL) -> Callable[[Results], Measured | None]:
    def measure(results: Results) -> Measured | None:
        entry = _headline_entry(results, connections, impl)
        if entry is None or "over_200ms" not in entry:
            return None
        return Measured(float(entry["over_200ms"]), "; ".join(w for w in (
            f"{entry['over_200ms']:,} of {entry.get('requests', 0):,} requests over {entry['runs']} run(s)",
            _long_move_where(entry), kept_where(entry)) if w))
    return measure


# The threshold the request client counts `over_200ms` with (TCP_RTO_MIN): a request that waited this long was
# resent, or waited as long for another reason (a move that long, answers queued behind one the move held back).
RTO_MS = RTO_S * 1000


def _long_move_where(entry: Gap) -> str:
    """When the move itself (freeze to unlock, and the handoff; medians of the runs, or the longest run's) took
    RTO_MS or more, a request caught in it waited that long without any retransmission, and the move's phases say
    where that went; when requests due after it also waited RTO_MS or more (answers queued behind those the move
    held back), that too. "" otherwise, or when the entry has no move time."""
    downtime = entry.get("downtime_ms", math.nan)
    took = downtime + (entry.get("phases_ms") or {}).get("handoff", 0.0)
    longest = entry.get("longest_move_ms", math.nan)
    if math.isnan(downtime) or (took < RTO_MS and not longest >= RTO_MS):
        return ""
    if took >= RTO_MS:
        where = f"the move itself took {human_us(took * 1000)} (medians of the runs; {_move_where(entry)})"
    else:
        where = (f"the longest move of the runs took {human_us(longest * 1000)} (the median {human_us(took * 1000)}: "
                 f"{_move_where(entry)})")
    where += ": a request caught in it waited that long without any retransmission"
    if entry.get("later_ms", 0.0) >= RTO_MS:
        where += (f", and requests due after it waited up to {human_us(entry['later_ms'] * 1000)} behind the "
                  "answers it held back")
    return where


TARGETS = (
    Target("single-0", "One connection, 0 B, no lock: sockrepair / minimal C", 1.5, "x", False, _ratio_to(C_IMPL, 0),
           "6"),
    Target("single-0-options", "One connection, 0 B, no lock: sockrepair / like-for-like C", 1.5, "x", False,
           _ratio_to(C_OPTIONS_IMPL, 0), "13", (C_OPTIONS_IMPL, 0)),
    Target("single-1MiB", "One connection, 1 MiB queues: sockrepair / warm C", 1.3, "x", False,
           _ratio_to(C_WARM_IMPL, 1 << 20), "6, 13", (C_WARM_IMPL, 1 << 20)),
    Target("image-1MiB", "Image encode + decode, 1 MiB queues: share of sockrepair's cycle", 10.0, "%", False,
           _image_share(1 << 20), "13"),
    Target("lock", "Lock + unlock one connection (sockrepair)", 150.0, "µs", False, _lock, "6"),
    Target("batch-10000", "10,000 connections including the lock", BATCH_TARGET, "conn/s", True, _batch(10_000),
           "6, 13"),
    *(Target(f"rto-{n}", f"Requests waiting 200 ms or more across a move, {connections(n)}", 0.0, "requests",
             False, _rto(n), "11") for n in GAP_TARGETS_MS),
    *(Target(f"gap-{n}", f"Worst request latency across a move, {connections(n)}", limit, "ms", False, _gap(n),
             "6, 11") for n, limit in GAP_TARGETS_MS.items()),
    # issue 11 asks the same of the cross-host part (bench_crosshost: the lab's two hosts)
    *(Target(f"rto-crosshost-{n}", f"Requests waiting 200 ms or more across a move between hosts, {connections(n)}",
             0.0, "requests", False, _rto(n, CROSSHOST_IMPL), "11") for n in GAP_TARGETS_MS),
    *(Target(f"gap-crosshost-{n}", f"Worst request latency across a move between hosts, {connections(n)}", limit,
             "ms", False, _gap(n, CROSSHOST_IMPL), "11") for n, limit in GAP_TARGETS_MS.items()),
)


def _amount(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "conn/s":
        return f"{value:,.0f} conn/s"
    if unit == "requests":
        return f"{value:,.0f} request{'' if value == 1 else 's'}"
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:,.1f} {unit}"


def judge(target: Target, measured: Measured | None) -> str:
    """"met", "missed by ...", or "not measured"."""
    if measured is None or math.isnan(measured.value):
        return "not measured"
    over = measured.value - target.limit
    if target.higher_is_better:
        over = -over
    if over <= 0:
        return "met"
    if not target.limit:
        return f"missed by {_amount(over, target.unit)}"
    return f"missed by {_amount(over, target.unit)} ({over / target.limit:.0%})"


def missed(results: Results) -> list[str]:
    """Keys of the targets this run measured and missed."""
    return [t.key for t in TARGETS if judge(t, t.measure(results)).startswith("missed")]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _verified(entry: Any) -> str:
    if entry["verified"]:
        return "yes"
    return "**NO**" + (f": {entry['error']}" if entry.get("error") else "")


def _impl_rank(impl: str) -> tuple[int, str]:
    rank = {c: i for i, c in enumerate((*C_IMPLS, SOCKREPAIR_IMPL))}
    return (rank.get(impl, len(rank)), impl)


def _c_references(entries: Sequence[Any], key: str, value: Callable[[Any], float]) -> dict[str, dict[Any, float]]:
    """For each C variant present, in C_IMPLS order: its figure by `key` (queue size or connection count)."""
    refs: dict[str, dict[Any, float]] = {}
    for impl in C_IMPLS:
        mine = {e[key]: value(e) for e in entries if e["impl"] == impl}
        if mine:
            refs[impl] = mine
    return refs


def _ratio(value: float, ref: float | None) -> str:
    return "—" if not ref or math.isnan(value) or math.isnan(ref) else f"{value / ref:.2f}x"


def targets_section(results: Results) -> list[str]:
    """Every target with the issues that set it, its measured value and status ("missed by" how much, and where the
    time goes), and, for a ratio the independent check also measures, the check's ratio and verdict beside it."""
    rows = []
    for t in TARGETS:
        m = t.measure(results)
        bound = "≥" if t.higher_is_better else "≤"
        status = judge(t, m)
        where = m.where if m is not None and status.startswith("missed") else ""
        rows.append([t.text, t.issues, f"{bound} {_amount(t.limit, t.unit)}",
                     "—" if m is None else _amount(m.value, t.unit), status, _check_cell(results, t), where])
    return ["## Targets (issues 6, 11 and 13)", "",
            *_table(["target", "issue", "limit", "measured", "status", "independent check", "where the time goes"],
                    rows), ""]


def _check_cell(results: Results, target: Target) -> str:
    """The independent check's ratio for the target's C variant and size, and whether it agrees with the bench's
    (the section "Independent check" says why not); "—" for a target no check measures or a run without one."""
    if target.check is None:
        return "—"
    c_impl, queue = target.check
    entry = next((e for e in results.get("independent") or [] if e["c_impl"] == c_impl and e["queue_bytes"] == queue),
                 None)
    if entry is None:
        return "not run"
    a = agreement(entry, _single(results, SOCKREPAIR_IMPL, queue), _single(results, c_impl, queue))
    return f"{entry['ratio']:.2f}x: " + {True: "agrees", False: "does not agree", None: "not judged"}[a.agrees]


# The independent check agrees with the bench when their ratios are within this factor of each other: on the
# 2-vCPU development machine, shared with other work, repeated runs of either harness move a 0 B median by up to
# about 15% (docs/benchmarks.md), and a ratio divides two such medians.
AGREEMENT = 1.25
# fewer cycles than this per side (a quick run) make medians too rough to judge agreement on
AGREEMENT_MIN_REPS = 50


@dataclass(frozen=True)
class Agreement:
    """The independent check against the bench's ratio for the same size and C variant."""

    bench_ratio: float  # nan when the bench has no such pair of entries
    agrees: bool | None  # None: not judged
    why: str  # for anything but "agrees": why not, or why it is not judged




def agreement(check: Independent, ours: Single | None, ref: Single | None, tolerance: float = AGREEMENT,
              min_reps: int = AGREEMENT_MIN_REPS) -> Agreement:
    """Whether the check's ratio (python_us / c_us, in one process) and the bench's (sockrepair's median total over
    the `c_impl` C's, for the same queue size) are within `tolerance` of each other. When they are not, `why` says
    which cycle moved between the harnesses, by how much, and what differed in how they ran (sizes interleaved rep
    by rep instead of blocks; too few cycles; bytes not verified)."""
    if ours is None or ref is None:
        missing = " and ".join(what for what, e in (("sockrepair", ours), (C_NAMES.get(check["c_impl"],
                                                                                        check["c_impl"]), ref))
                               if e is None)
        return Agreement(math.nan, None, f"the bench has no {human_bytes(check['queue_bytes'])} entry of {missing}")
    bench_python, bench_c = ours["total"]["median_us"], ref["total"]["median_us"]
    if not bench_c or math.isnan(bench_python) or math.isnan(bench_c) or math.isnan(check["ratio"]):
        return Agreement(math.nan, None, "a median is missing")
    bench = bench_python / bench_c
    unverified = [what for what, e in (("the check", check), ("sockrepair", ours), ("the C reference", ref))
                  if not e["verified"]]
    if unverified:
        return Agreement(bench, None, f"not verified: {', '.join(unverified)}")
    fewest = min(check["reps"], ours["reps"], ref["reps"])
    if fewest < min_reps:
        return Agreement(bench, None, f"too few cycles to judge ({fewest}, at least {min_reps} needed)")
    if max(bench, check["ratio"]) / min(bench, check["ratio"]) <= tolerance:
        return Agreement(bench, True, "")
    why = [f"the bench's Python cycle takes {bench_python / check['python_us']:.2f}x the check's "
           f"({human_us(bench_python)} against {human_us(check['python_us'])}), its C cycle "
           f"{bench_c / check['c_us']:.2f}x ({human_us(bench_c)} against {human_us(check['c_us'])})"]
    rep_by_rep = [what for what, e in (("the bench's sockrepair", ours), ("its C", ref), ("the check", check))
                  if "block" not in e]
    if rep_by_rep:
        why.append(f"run rep by rep, not in blocks ({', '.join(rep_by_rep)}): a cycle started with caches cooled by "
                   "another one's megabytes")
    elif len({ours["block"], ref["block"], check["block"]}) > 1:
        why.append("their blocks differ in length")
    return Agreement(bench, False, "; ".join(why))


def independent_section(results: Results, tolerance: float = AGREEMENT) -> list[str]:
    """The independent check (sockrepair/bench/independent.py) next to the ratio the bench measured for the same size
    against the same C variant, with agreement()'s verdict."""
    entries = results.get("independent") or []
    if not entries:
        return []
    rows = []
    for e in entries:
        a = agreement(e, _single(results, SOCKREPAIR_IMPL, e["queue_bytes"]),
                      _single(results, e["c_impl"], e["queue_bytes"]), tolerance)
        verdict = {True: "yes", False: "**no**", None: "not judged"}[a.agrees] + (f": {a.why}" if a.why else "")
        phases = ", ".join(f"{p.replace('_', ' ')} {human_us(us)}" for p, us in e["python_phases_us"].items())
        rows.append([human_bytes(e["queue_bytes"]), C_NAMES.get(e["c_impl"], e["c_impl"]), human_us(e["python_us"]),
                     human_us(e["c_us"]), f"{e['ratio']:.2f}x",
                     "—" if math.isnan(a.bench_ratio) else f"{a.bench_ratio:.2f}x", verdict, phases, str(e["reps"]),
                     _verified(e)])
    return ["## Independent check", "",
            "In one process, a Python cycle of one loopback connection (checkpoint, to_bytes, discard, from_bytes, "
            "restore) and the C reference called as a library (buffers kept, as its warm variant; like-for-like "
            "options at 0 B), in blocks of consecutive cycles of one size after an untimed one, Python and C "
            "alternating block by block, as the bench runs its single mode; medians. Bench ratio: the "
            "single-connection table's for the same size and C variant. They agree when within "
            f"{tolerance:g}x of each other (the spread of repeated runs on a shared 2-vCPU machine); otherwise the "
            "row says which cycle moved between the harnesses.", "",
            *_table(["queue", "C", "Python cycle", "C cycle", "ratio", "bench ratio", "agrees",
                     "Python phases", "reps", "verified"], rows), ""]


def option_differences(ours: Syscalls, ref: Syscalls) -> tuple[dict[str, int], dict[str, int]]:
    """Socket option calls (by call, level and name) that one cycle makes more often than the other: sockrepair's
    extra, then the C's extra; both empty when the C reference does the same option work as the engine."""
    mine, theirs = Counter(ours["options"]), Counter(ref["options"])
    return dict(sorted((mine - theirs).items())), dict(sorted((theirs - mine).items()))


def syscalls_section(results: Results) -> list[str]:
    """System calls per traced cycle, by name, and where the like-for-like C was traced, the option calls only one
    side makes."""
    entries = results.get("syscalls") or []
    if not entries:
        return []
    names = list(dict.fromkeys(name for e in entries for name in e["calls"]))[:8]
    rows = [[human_bytes(e["queue_bytes"]), e["impl"], str(e["total"]), *(str(e["calls"].get(n, 0)) for n in names),
             str(e["total"] - sum(e["calls"].get(n, 0) for n in names))] for e in entries]
    lines = ["## System calls per cycle", "",
             "One cycle of each, after a warm-up, traced by strace in the independent check's setting "
             "(sockrepair/bench/syscalls.py), timed part only (the C side's untimed queue-length reads and option "
             "check left out).", "", *_table(["queue", "impl", "total", *names, "other"], rows), ""]
    by_size: dict[int, dict[str, Syscalls]] = {}
    for e in entries:
        by_size.setdefault(e["queue_bytes"], {})[e["impl"]] = e
    for queue, pair in by_size.items():
        ours = pair.get(SOCKREPAIR_IMPL)
        for impl, ref in pair.items():
            if ours is None or impl != C_OPTIONS_IMPL:  # the other variants keep no options, by design
                continue
            extra, missing = option_differences(ours, ref)
            if not extra and not missing:
                lines.append(f"- {human_bytes(queue)}: {C_NAMES.get(impl, impl)} makes the same option calls as "
                             "sockrepair.")
                continue
            said = [f"sockrepair makes {sum(extra.values())} option call(s) the {C_NAMES.get(impl, impl)} does not "
                    f"({', '.join(f'{k} x{n}' if n > 1 else k for k, n in extra.items()) or 'none'})"]
            if missing:
                said.append(f"it makes {sum(missing.values())} sockrepair does not "
                            f"({', '.join(f'{k} x{n}' if n > 1 else k for k, n in missing.items())})")
            lines.append(f"- {human_bytes(queue)}: " + "; ".join(said) + ".")
    return [*lines, ""]


def profiles_section(results: Results) -> list[str]:
    profiles = results.get("profiles") or {}
    texts = {t.key: t.text for t in TARGETS}
    lines: list[str] = []
    for key, prof in profiles.items():
        lines += [f"### {texts.get(key, key)}", "",
                  f"{prof['what']}; cProfile, per cycle over {prof['cycles']} cycle(s), by own time (the profiler "
                  "itself slows each call, so the times are larger than the benchmark's):", ""]
        rows = [[f"`{r['function']}`", f"{r['calls']:,}", human_us(r["own_ms"] * 1000),
                 human_us(r["cumulative_ms"] * 1000)] for r in prof["rows"]]
        lines += [*_table(["function", "calls", "own", "with callees"], rows), ""]
    return ["## Where the time goes: profiles of the missed targets", "", *lines] if lines else []


def single_section(results: Results) -> list[str]:
    entries = sorted(results["single"], key=lambda e: (e["queue_bytes"], _impl_rank(e["impl"])))
    if not entries:
        return []
    phases = [p for p in PHASES if any(p in e["phases"] for e in entries)]
    refs = _c_references(entries, "queue_bytes", lambda e: e["total"]["median_us"])
    rows = []
    for e in entries:
        cells = [human_us(e["phases"][p]["median_us"]) if p in e["phases"] else "—" for p in phases]
        ratios = [_ratio(e["total"]["median_us"], ref.get(e["queue_bytes"])) for ref in refs.values()]
        rows.append([human_bytes(e["queue_bytes"]), e["impl"], *cells, human_us(e["total"]["median_us"]),
                     human_us(e["total"]["p99_us"]), *ratios, str(e["reps"]), _verified(e)])
    header = ["queue", "impl", *(p.replace("_", " ") for p in phases), "total", "total p99",
              *(C_COLUMNS[impl] for impl in refs), "reps", "verified"]
    caption = ("Phase columns are medians; total is the median (and p99) of each cycle's sum of phases; x C divides "
               "it by the C reference's median for the same queue size, measured in the same run.")
    if len(refs) > 1:
        caption += (" x C is the minimal C with its queue buffers malloc'd at every checkpoint (cold), x C warm the "
                    "same with its buffers reused (the physical limit, which judges the sizes above 0 B; the cold "
                    "ratio is information), x C options the like-for-like C that also reads and sets the "
                    "engine's socket options (with the minimal C, it judges 0 B).")
    return ["## One connection: freeze-to-resume by phase", "", caption, "", *_table(header, rows), ""]


def batch_section(results: Results) -> list[str]:
    entries = sorted(results["batch"], key=lambda e: (e["connections"], _impl_rank(e["impl"]), e["with_lock"]))
    if not entries:
        return []
    refs = _c_references([e for e in entries if not e["with_lock"]], "connections", lambda e: e["seconds"])
    rows = [[f"{e['connections']:,}", e["impl"], "yes" if e["with_lock"] else "no", human_us(e["seconds"] * 1e6),
             "—" if math.isnan(e["conn_per_s"]) else f"{e['conn_per_s']:,.0f}",
             *(_ratio(e["seconds"], ref.get(e["connections"])) for ref in refs.values()), str(e["reps"]),
             _verified(e)]
            for e in entries]
    caption = "Median over runs; x C divides the time by the C reference's (which takes no lock)."
    if len(refs) > 1:
        caption += " x C options divides it by the like-for-like C's, which also keeps the engine's socket options."
    header = ["connections", "impl", "lock", "time", "conn/s", *(C_COLUMNS[impl] for impl in refs), "runs",
              "verified"]
    return ["## Batches: connections checkpointed, then restored", "", caption, "", *_table(header, rows), ""]


def lock_section(results: Results) -> list[str]:
    entries = sorted(results["lock"], key=lambda e: e["median_us"])
    if not entries:
        return []
    ours = next((e["median_us"] for e in entries if e["method"] == SOCKREPAIR_IMPL), None)
    rows = [[e["method"], human_us(e["median_us"]), human_us(e["p99_us"]), _ratio(e["median_us"], ours),
             str(e["reps"])] for e in entries]
    return ["## Lock + unlock of one connection, by method", "",
            *_table(["method", "median", "p99", "x sockrepair", "reps"], rows), ""]


def _impl_order(impl: str) -> tuple[int, str]:
    order = ("sockrepair", "sockrepair-droplock", "criu-nftables", "criu-iptables")
    base = impl.removesuffix("-crosshost")
    return (order.index(base) if base in order else len(order), impl)


def _ms_cell(ms: float) -> str:
    return "—" if math.isnan(ms) else human_us(ms * 1000)


def headline_section(results: Results) -> list[str]:
    """The worst request latency across a move, and how many requests waited a retransmission timeout, for every
    variant and connection count of the requests workload; then the streaming peer's longest pause."""
    lines: list[str] = []
    requests = sorted((e for e in results["gap"] if workload(e) == "requests"),
                      key=lambda e: (e["impl"].endswith("-crosshost"), e["connections"], _impl_order(e["impl"])))
    if requests:
        rows = [[f"{e['connections']:,}", e["impl"], _ms_cell(e["gap_ms"]), _ms_cell(e["max_gap_ms"]),
                 f"{e['over_200ms']:,}" if "over_200ms" in e else "—",
                 f"{e['requests']:,}" if "requests" in e else "—", _ms_cell(e.get("baseline_ms", math.nan)),
                 _ms_cell(e.get("later_ms", math.nan)), _ms_cell(e.get("downtime_ms", math.nan)),
                 f"{e['kept_delivered']:,} / {e.get('kept_fell_back', 0):,}" if "kept_delivered" in e else "—",
                 (f"{e['restored_unacked']:,}" + (f" ({e['over_200ms_unacked']:,})" if "over_200ms_unacked" in e
                                                   else "")) if "restored_unacked" in e else "—",
                 str(e["runs"]), _verified(e)] for e in requests]
        lines += ["## Headline: request latency across a move", "",
                  "N independent request/response clients, 64-byte requests at Poisson arrivals (mean interval per "
                  "connection in docs/benchmarks.md), each request timed from the moment it was due to its whole "
                  "answer. worst: median over runs of each run's worst request answered after the move began "
                  "(worst of runs: the largest); >= 200 ms: requests that waited a retransmission timeout, all "
                  "runs together; before the move: the worst request answered before it began (the noise of the "
                  "machine); after the move: the worst request due after the move and its handoff had ended, "
                  "the move counted from its freeze for sockrepair, from the call for criu (larger than before the "
                  "move when requests waited behind the answers the move held back); worst and before the move "
                  "count from the call, whose setup takes milliseconds before the freeze; "
                  "kept: "
                  "packets the keeping lock delivered to the restored sockets / left to the peers' retransmission; "
                  "unacked: "
                  "restored sockets holding output the peer had not acknowledged at the handoff (an answer the lock "
                  "stopped waits for their retransmission timer), all runs together, and in brackets the requests "
                  ">= 200 ms on those connections.",
                  "", *_table(["connections", "impl", "worst", "worst of runs", ">= 200 ms", "requests",
                               "before the move", "after the move", "move", "kept", "unacked", "runs", "verified"],
                              rows), ""]
    stream = sorted((e for e in results["gap"] if workload(e) == "stream"),
                    key=lambda e: (e["impl"].endswith("-crosshost"), e["connections"], _impl_order(e["impl"])))
    if stream:
        rows = [[f"{e['connections']:,}", e["impl"], _ms_cell(e["gap_ms"]), _ms_cell(e["max_gap_ms"]),
                 _ms_cell(e.get("interval_ms", math.nan)), _ms_cell(e.get("baseline_ms", math.nan)),
                 _ms_cell(e.get("downtime_ms", math.nan)), str(e["runs"]), _verified(e)] for e in stream]
        lines += ["### A peer streaming in both directions", "",
                  "Longest pause in what the peer received after the move began (median over runs; largest), each "
                  "connection writing 1 KiB every `interval` while the echo streams back. Here the dropping lock "
                  "costs little after the unlock: the peer's next write reaches the restored socket past the hole "
                  "the lock left, and its SACK (or the peer's tail-loss probe, a few ms after a send) has the peer "
                  "resend the hole at once, without its retransmission timeout; the keeping lock's delivery, inside "
                  "the move, makes the move longer (the `move` column). A request/response peer sends nothing more "
                  "until it is answered: no such recovery comes, and only the keeping lock spares it the timeout (the "
                  "requests table).", "",
                  *_table(["connections", "impl", "longest pause", "largest", "interval", "before the move", "move",
                           "runs", "verified"], rows), ""]
    return lines


def gap_section(results: Results) -> list[str]:
    entries = sorted(results["gap"], key=lambda e: (workload(e), e["connections"], _impl_rank(e["impl"])))
    if not entries:
        return []
    rows = [[workload(e), f"{e['connections']:,}", e["impl"], human_us(e["gap_ms"] * 1000),
             human_us(e["max_gap_ms"] * 1000), human_us(e.get("downtime_ms", math.nan) * 1000),
             human_us(e["wire_gap_ms"] * 1000) if "wire_gap_ms" in e else "—",
             str(e["runs"]), _verified(e)] for e in entries]
    return ["## Gap the peer sees during a migration", "",
            "Median over runs of each run's worst (requests: the worst request latency; stream: the longest pause "
            "in what the peer received; pingpong: the longest round trip), and the largest of all runs; move: the "
            "migration's own time (sockrepair: freeze to unlock; criu: dump plus restore); wire gap (cross-host): "
            "the peer's wire silent from the freeze to the resume.", "",
            *_table(["workload", "connections", "impl", "median gap", "largest gap", "move", "wire gap", "runs",
                     "verified"], rows), ""]


def machine_section(results: Results) -> list[str]:
    rows = [[key, "—" if value is None else str(value)] for key, value in results["machine"].items()]
    return ["## Machine", "", *_table(["what", "value"], rows), ""]


def markdown(results: Results, plots: Sequence[Path] = ()) -> str:
    lines = ["# sockrepair benchmark results", ""]
    if results["notes"]:
        lines += [*(f"- {note}" for note in results["notes"]), ""]
    lines += headline_section(results)
    lines += targets_section(results)
    lines += independent_section(results)
    lines += syscalls_section(results)
    lines += profiles_section(results)
    lines += single_section(results)
    lines += batch_section(results)
    lines += lock_section(results)
    lines += gap_section(results)
    if plots:
        lines += ["## Plots", "", *(f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots), ""]
    lines += machine_section(results)
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN (a figure that was not measured) is not JSON: it is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write(results: Results, out_dir: Path) -> list[Path]:
    """results.json, the PNG plots and results.md (which shows them) in out_dir; returns the paths written."""
    results = check(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    plots = write_plots(results, out_dir)
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(results, plots))
    return [json_path, md_path, *plots]


def _restore_nan(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: v if k in ("error", "machine", "what", "function") else _restore_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_nan(v) for v in value]
    return value


def load(path: Path) -> Results:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise BenchmarkError(f"cannot read {path}: {exc.strerror}", part="report") from None
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}", part="report") from None
    data = check(data)
    for section in ("single", "batch", "lock", "gap", "profiles"):
        data[section] = _restore_nan(data[section])
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sockrepair.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results.json written by a benchmark run")
    parser.add_argument("--out", type=Path, default=None, help="directory for the report (default: next to it)")
    args = parser.parse_args(argv)
    try:
        written = write(load(args.results), args.out or args.results.parent)
    except SockrepairError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
