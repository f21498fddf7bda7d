"""PNG plots of a run's results (matplotlib, Agg backend: no display needed). Each plot is drawn only when the run
has data for it."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullLocator  # noqa: E402

from sockrepair.bench.results import (  # noqa: E402
    BATCH_TARGET,
    C_IMPL,
    GAP_TARGETS_MS,
    PHASES,
    SOCKREPAIR_IMPL,
    Batch,
    Gap,
    Results,
    Single,
    workload,
)
from sockrepair.bench.units import human_bytes, human_count  # noqa: E402

PHASE_COLORS = dict(zip(PHASES, ("#8c564b", "#1f77b4", "#9467bd", "#7f7f7f", "#17becf", "#2ca02c", "#e377c2")))
FIXED_IMPL_COLORS = {C_IMPL: "#444444", SOCKREPAIR_IMPL: "#1f77b4"}
OTHER_COLORS = ("#ff7f0e", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22")
DPI = 120


def impl_colors(impls: Sequence[str]) -> dict[str, str]:
    others = iter(OTHER_COLORS * (len(impls) // len(OTHER_COLORS) + 1))
    return {impl: FIXED_IMPL_COLORS.get(impl) or next(others) for impl in impls}


def _ordered_impls(impls: set[str]) -> list[str]:
    """The C reference first and sockrepair second, so colours and bars sit in the same place in every plot."""
    rank = {C_IMPL: 0, SOCKREPAIR_IMPL: 1}
    return sorted(impls, key=lambda i: (rank.get(i, 2), i))


def _us_axis_label(values_us: Sequence[float]) -> tuple[float, str]:
    top = max((v for v in values_us if not math.isnan(v)), default=0.0)
    return (1000.0, "ms") if top >= 2000 else (1.0, "µs")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def phases_plot(single: Sequence[Single], path: Path) -> Path:
    """One panel per queue size, one stacked bar per implementation: where the cycle's time goes."""
    sizes = sorted({e["queue_bytes"] for e in single})
    phases = [p for p in PHASES if any(p in e["phases"] for e in single)]
    fig, axes = plt.subplots(1, len(sizes), figsize=(2.2 + 2.3 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        entries = {e["impl"]: e for e in single if e["queue_bytes"] == size}
        impls = _ordered_impls(set(entries))
        scale, unit = _us_axis_label([e["total"]["median_us"] for e in entries.values()])
        bottoms = [0.0] * len(impls)
        for phase in phases:
            heights = [entries[i]["phases"].get(phase, {"median_us": 0.0})["median_us"] / scale for i in impls]
            ax.bar(impls, heights, bottom=bottoms, color=PHASE_COLORS[phase], label=phase.replace("_", " "),
                   width=0.6)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        for x, impl in enumerate(impls):
            if not entries[impl]["verified"]:
                ax.annotate("not verified", (x, bottoms[x]), ha="center", va="bottom", color="red", fontsize=8)
        ax.set_title(human_bytes(size) + " per queue", fontsize=10)
        ax.set_ylabel(f"median ({unit})")
        ax.tick_params(axis="x", labelrotation=20 if len(impls) > 2 else 0, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(phases), frameon=False, bbox_to_anchor=(0.5, 1.06))
    fig.suptitle("One connection: freeze-to-resume time by phase (medians)", y=1.12)
    fig.tight_layout()
    return _save(fig, path)


def queue_plot(single: Sequence[Single], path: Path) -> Path:
    """Median (solid) and p99 (dashed) cycle time against queue size, log-log, one line per implementation."""
    impls = _ordered_impls({e["impl"] for e in single})
    colors = impl_colors(impls)
    sizes = sorted({e["queue_bytes"] for e in single})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for impl in impls:
        entries = sorted((e for e in single if e["impl"] == impl), key=lambda e: e["queue_bytes"])
        xs = [e["queue_bytes"] for e in entries]
        ax.plot(xs, [e["total"]["median_us"] for e in entries], marker="o", color=colors[impl],
                label=f"{impl} median")
        ax.plot(xs, [e["total"]["p99_us"] for e in entries], linestyle="--", linewidth=1, color=colors[impl],
                alpha=0.7, label=f"{impl} p99")
    # 0 B has no place on a log axis: a symmetric-log axis keeps it, squeezed into a short linear stretch
    smallest = min((s for s in sizes if s > 0), default=1024)
    ax.set_xscale("symlog", linthresh=smallest / 2, linscale=0.4)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(int(round(v)))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} µs" if v < 1000 else f"{v / 1000:g} ms"))
    ax.set_xlabel("bytes in each queue (send and receive)")
    ax.set_ylabel("freeze-to-resume time")
    ax.set_title("One connection: cycle time vs queue size")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def batch_plot(batch: Sequence[Batch], path: Path) -> Path:
    """Connections per second against batch size, one line per implementation (and lock use)."""
    series: dict[tuple[str, bool], list[Batch]] = defaultdict(list)
    for e in batch:
        series[(e["impl"], e["with_lock"])].append(e)
    colors = impl_colors(_ordered_impls({impl for impl, _ in series}))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for impl, locked in sorted(series, key=lambda s: (_ordered_impls(set(colors)).index(s[0]), s[1])):
        entries = sorted(series[(impl, locked)], key=lambda e: e["connections"])
        # an implementation's colour is the same with and without the lock; the line style tells them apart
        ax.plot([e["connections"] for e in entries], [e["conn_per_s"] for e in entries], marker="o",
                color=colors[impl], linestyle="-" if locked or impl == C_IMPL else "--",
                label=f"{impl} + lock" if locked else impl)
    ax.axhline(BATCH_TARGET, color="black", linewidth=1, linestyle=":",
               label=f"target: sockrepair + lock ≥ {human_count(BATCH_TARGET)}/s at 10,000")
    ax.set_xscale("log")
    ax.set_xticks(sorted({e["connections"] for e in batch}))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_count(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_count(v)))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("connections checkpointed and restored together")
    ax.set_ylabel("connections per second")
    ax.set_title("Batches: throughput vs batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def gap_plot(gap: Sequence[Gap], path: Path) -> Path:
    """Grouped bars, log scale: the worst request latency across a move (the longest silence of a ping-pong peer in
    a run saved before the workloads), every variant side by side, by connection count."""
    requests = [e for e in gap if workload(e) == "requests"]
    gap = requests or [e for e in gap if workload(e) == "pingpong"]
    counts = sorted({e["connections"] for e in gap})
    impls = _ordered_impls({e["impl"] for e in gap})
    colors = impl_colors(impls)
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, impl in enumerate(impls):
        by_count = {e["connections"]: e for e in gap if e["impl"] == impl}
        xs = [i + (k - (len(impls) - 1) / 2) * width for i, n in enumerate(counts) if n in by_count]
        ys = [by_count[n]["gap_ms"] for n in counts if n in by_count]
        bars = ax.bar(xs, ys, width=width * 0.95, color=colors[impl], label=impl)
        ax.bar_label(bars, labels=[_ms(y) for y in ys], fontsize=7, padding=2)
    for i, n in enumerate(counts):
        if n in GAP_TARGETS_MS:
            ax.hlines(GAP_TARGETS_MS[n], i - 0.45, i + 0.45, colors="black", linestyles=":",
                      label="sockrepair target" if i == 0 else "_nolegend_")
    ax.set_yscale("log")
    # bars grow from the bottom of a log axis: start it well below the smallest value so short bars still show
    low = min([e["gap_ms"] for e in gap] + [GAP_TARGETS_MS[n] for n in counts if n in GAP_TARGETS_MS])
    ax.set_ylim(bottom=low / 4)
    ax.set_xticks(range(len(counts)), [f"{human_count(n)} conn." for n in counts])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _ms(v)))
    ax.set_ylabel(("worst request latency" if requests else "longest gap seen by the peer") + " (median of runs)")
    ax.set_title("Worst request latency across a move: sockrepair vs criu" if requests
                 else "Peer-seen gap during migration: sockrepair vs criu")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _ms(v: float) -> str:
    return f"{v:.3g} ms" if v < 1000 else f"{v / 1000:.3g} s"


def write_plots(results: Results, out_dir: Path) -> list[Path]:
    written = []
    if results["single"]:
        written.append(phases_plot(results["single"], out_dir / "latency_by_phase.png"))
        written.append(queue_plot(results["single"], out_dir / "latency_vs_queue.png"))
    if results["batch"]:
        written.append(batch_plot(results["batch"], out_dir / "batch_conn_per_s.png"))
    if any(workload(e) in ("requests", "pingpong") for e in results["gap"]):
        written.append(gap_plot(results["gap"], out_dir / "peer_gap.png"))
    return written
