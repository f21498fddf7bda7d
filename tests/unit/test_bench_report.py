"""The benchmark report on a synthetic run: every file written, ratios to each C variant in the tables, targets
judged against the variant that judges them, PNGs valid, a run saved before the variants still redrawn; and the C
reference's JSON turned into result entries."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from sockrepair.bench import cref, report
from sockrepair.bench.results import (
    Independent,
    Results,
    ResultsError,
    batch_from_samples,
    check,
    empty,
    merge_single,
    p99,
    single_from_samples,
)
from sockrepair.errors import BenchmarkError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _single(impl: str, queue: int, read: float, close: float, restore: float, reps: int = 10, **extra: float):
    samples = {"read_state": [read] * reps, "close": [close] * reps, "restore": [restore] * reps}
    samples.update({name: [value] * reps for name, value in extra.items()})
    return single_from_samples(impl, queue, samples, verified=True)


def synthetic(with_gap: bool = True) -> Results:
    results = empty({"cpu": "Test CPU", "cpus": 2, "kernel": "6.18", "python": "CPython 3.11", "criu": None})
    results["single"] = [
        _single("c", 0, 6.0, 3.0, 11.0),                                  # 20 us
        _single("c-options", 0, 9.0, 3.0, 12.0),                          # 24 us
        _single("sockrepair", 0, 9.0, 4.0, 15.0, lock=0.0, serialize=2.0),  # 30 us: 1.50x minimal, 1.25x options: met
        _single("c", 1 << 20, 400.0, 100.0, 500.0),                       # 1 ms (cold: information)
        _single("c-warm", 1 << 20, 200.0, 50.0, 250.0),                   # 500 us
        _single("sockrepair", 1 << 20, 800.0, 150.0, 1050.0),             # 2 ms: 2.00x cold, 4.00x warm: missed
    ]
    results["batch"] = [
        batch_from_samples("c", 10_000, {"read_state": [0.05] * 3, "close": [0.05] * 3, "restore": [0.1] * 3},
                           verified=True, with_lock=False),  # 0.2 s
        batch_from_samples("c-options", 10_000, {"read_state": [0.1] * 3, "close": [0.05] * 3, "restore": [0.1] * 3},
                           verified=True, with_lock=False),  # 0.25 s
        batch_from_samples("sockrepair", 10_000, {"lock": [0.1] * 3, "read_state": [0.2] * 3, "restore": [0.2] * 3},
                           verified=True, with_lock=True),   # 0.5 s: 20,000 conn/s, 2.50x
    ]
    results["lock"] = [
        {"method": "sockrepair", "reps": 50, "median_us": 100.0, "p99_us": 180.0},
        {"method": "nft CLI", "reps": 20, "median_us": 20_000.0, "p99_us": 50_000.0},
    ]
    if with_gap:
        results["gap"] = [
            {"impl": "sockrepair", "connections": 1, "runs": 3, "gap_ms": 1.2, "max_gap_ms": 1.9, "verified": True},
            {"impl": "criu-iptables", "connections": 1, "runs": 3, "gap_ms": 170.0, "max_gap_ms": 181.0,
             "verified": True},
        ]
    return results


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_every_file_is_written_and_the_pngs_are_valid(tmp_path: Path) -> None:
    written = report.write(synthetic(), tmp_path)
    names = {p.name for p in written}
    assert names == {"results.json", "results.md", "latency_by_phase.png", "latency_vs_queue.png",
                     "batch_conn_per_s.png", "peer_gap.png"}
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    for png in (p for p in written if p.suffix == ".png"):
        width, height = _png_size(png)
        assert width > 300 and height > 200
    md = (tmp_path / "results.md").read_text()
    for png in (p for p in written if p.suffix == ".png"):
        assert f"({png.name})" in md


def test_tables_give_ratios_to_c_of_the_same_queue_size(tmp_path: Path) -> None:
    report.write(synthetic(), tmp_path)
    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert "| total p99 | x C | x C warm | x C options | reps |" in md
    c_zero = next(r for r in rows if r.startswith("| 0 B | c |"))
    ours_zero = next(r for r in rows if r.startswith("| 0 B | sockrepair |"))
    ours_mib = next(r for r in rows if r.startswith("| 1 MiB | sockrepair |"))
    assert "| 1.00x |" in c_zero
    assert "| 30.0 µs |" in ours_zero and "| 1.50x | — | 1.25x |" in ours_zero
    assert "| 2.00 ms |" in ours_mib and "| 2.00x | 4.00x | — |" in ours_mib
    assert next(r for r in rows if r.startswith("| 1 MiB | c-warm |")).count("| 1.00x |") == 1
    assert "| runs | verified |" in md and "| conn/s | x C | x C options | runs |" in md
    batch = next(r for r in rows if r.startswith("| 10,000 | sockrepair |"))
    assert "| 20,000 |" in batch and "| 2.50x | 2.00x |" in batch
    nft = next(r for r in rows if r.startswith("| nft CLI |"))
    assert "| 200.00x |" in nft


def test_targets_are_marked_met_missed_or_not_measured(tmp_path: Path) -> None:
    md = report.markdown(synthetic())
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 1.50x | met |" in rows["One connection, 0 B, no lock: sockrepair / minimal C"]
    assert "| 1.25x | met |" in rows["One connection, 0 B, no lock: sockrepair / like-for-like C"]
    # judged against the warm C (4.00x), not the cold one (2.00x)
    mib = rows["One connection, 1 MiB queues: sockrepair / warm C"]
    assert "missed by 2.70x (208%)" in mib
    assert "restore 1.05 ms (52% of the cycle), warm C 250.0 µs" in mib
    assert "| met |" in rows["Lock + unlock one connection (sockrepair)"]
    batch = rows["10,000 connections including the lock"]
    assert "missed by 10,000 conn/s (33%)" in batch
    # every phase, per connection, largest first, against what the target allows and the C batches
    assert ("per connection: read_state 20.0 µs, restore 20.0 µs, lock 10.0 µs (of 50.0 µs; 30,000/s allows "
            "33.3 µs); minimal C 20.0 µs; like-for-like C 25.0 µs") in batch
    # a run saved before the workloads: the ping-pong gap stands in for the request latency
    assert "| met |" in rows["Worst request latency across a move, 1 connection"]
    assert "not measured" in rows["Worst request latency across a move, 100 connections"]
    assert "not measured" in rows["Requests waiting 200 ms or more across a move, 1 connection"]


def _requests(impl: str, n: int, worst: float, over: int, **extra: object) -> dict[str, object]:
    return {"impl": impl, "connections": n, "runs": 3, "gap_ms": worst, "max_gap_ms": worst * 1.1, "verified": True,
            "workload": "requests", "requests": 3000, "over_200ms": over, "downtime_ms": 1.5,
            "phases_ms": {"freeze": 0.3, "restore": 0.4, "deliver": 0.1}, **extra}


def test_the_headline_is_the_worst_request_and_the_requests_that_waited_200_ms(tmp_path: Path) -> None:
    results = synthetic()
    results["gap"] = [
        _requests("sockrepair", 1, 1.5, 0, kept_delivered=4, kept_fell_back=0, baseline_ms=0.9, restored_unacked=2),
        _requests("sockrepair-droplock", 1, 207.0, 5),
        _requests("sockrepair", 100, 35.0, 4, kept_delivered=40, kept_fell_back=1, baseline_ms=30.0,
                  later_ms=34.0, restored_unacked=3, over_200ms_unacked=2),
        _requests("criu-iptables", 100, 120.0, 0),
        {"impl": "sockrepair", "connections": 1, "runs": 2, "gap_ms": 9.0, "max_gap_ms": 9.5, "verified": True,
         "workload": "stream", "interval_ms": 2.0},
        {"impl": "sockrepair", "connections": 1, "runs": 3, "gap_ms": 50.0, "max_gap_ms": 60.0, "verified": True},
    ]
    report.write(results, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert md.index("## Headline: request latency across a move") < md.index("## Targets (issues 6, 11 and 13)")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 1.5 ms | met |" in rows["Worst request latency across a move, 1 connection"]
    hundred = rows["Worst request latency across a move, 100 connections"]
    assert "| 35.0 ms | missed by 15.0 ms (75%) |" in hundred
    assert "kept and delivered 40 packet(s), left 1" in hundred
    assert "3 socket(s) restored holding output the peer had not acknowledged" in hundred
    assert "2 of the 4 requests >= 200 ms were on those connections" in hundred
    # sockets restored with unacknowledged output cost nothing when no request waited: not a place the time went
    assert report.kept_where(results["gap"][0]) == "the lock kept and delivered 4 packet(s), left 0 to the peers' " \
        "retransmission"
    assert ("the worst request answered before the move began 30.00 ms, and due after it and its handoff ended "
            "34.00 ms") in hundred
    assert "| 0 requests | met |" in rows["Requests waiting 200 ms or more across a move, 1 connection"]
    headline = [line for line in md.splitlines() if line.startswith("| 1 | sockrepair-droplock |")]
    assert headline and "| 207.00 ms |" in headline[0] and "| 5 | 3,000 |" in headline[0]
    assert "### A peer streaming in both directions" in md
    assert any(line.startswith("| stream | 1 | sockrepair | 9.00 ms |") for line in md.splitlines())
    # the saved file reads back, the older ping-pong entry with it
    again = report.load(tmp_path / "results.json")
    assert [e.get("workload", "pingpong") for e in again["gap"]][-2:] == ["stream", "pingpong"]
    dropped = next(e for e in results["gap"] if e["impl"] == "sockrepair-droplock")
    dropped["over_200ms"] = 0
    results["gap"][0]["over_200ms"] = 2
    assert "rto-1" in report.missed(results)


def test_plots_without_data_are_not_drawn(tmp_path: Path) -> None:
    results = synthetic(with_gap=False)
    results["batch"] = []
    names = {p.name for p in report.write(results, tmp_path)}
    assert "peer_gap.png" not in names and "batch_conn_per_s.png" not in names
    assert "latency_by_phase.png" in names


def test_an_unverified_entry_says_so_with_its_reason(tmp_path: Path) -> None:
    results = synthetic()
    results["single"][0] = single_from_samples("c", 0, {"read_state": [1.0]}, verified=False,
                                               error="stream 3: wrong byte at offset 17")
    md = report.markdown(results)
    assert "**NO**: stream 3: wrong byte at offset 17" in md


def test_results_json_round_trips_and_redraws(tmp_path: Path) -> None:
    results = synthetic()
    results["single"].append(single_from_samples("c", 4096, {}, verified=False, error="no compiler"))
    report.write(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN tokens
    assert saved["single"][-1]["total"]["median_us"] is None
    loaded = report.load(tmp_path / "results.json")
    assert math.isnan(loaded["single"][-1]["total"]["median_us"])
    assert loaded["single"][-1]["error"] == "no compiler"
    out = tmp_path / "again"
    assert report.main([str(tmp_path / "results.json"), "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == (tmp_path / "results.md").read_text()


def test_a_run_saved_before_the_c_variants_is_redrawn(tmp_path: Path) -> None:
    results = synthetic()
    results["single"] = [e for e in results["single"] if e["impl"] in ("c", "sockrepair")]
    results["batch"] = [e for e in results["batch"] if e["impl"] != "c-options"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(results))
    assert report.main([str(old), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| total p99 | x C | reps |" in md and "x C warm" not in md and "x C options" not in md
    assert "| 2.00 ms |" in md and "| 2.00x |" in md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| met |" in rows["One connection, 0 B, no lock: sockrepair / minimal C"]
    assert "not measured" in rows["One connection, 0 B, no lock: sockrepair / like-for-like C"]
    assert "not measured" in rows["One connection, 1 MiB queues: sockrepair / warm C"]


def test_bad_results_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="lack the 'batch' key"):
        check({"machine": {}, "single": [], "lock": [], "gap": []})
    with pytest.raises(ResultsError, match=r"single\[0\] lacks total"):
        check({"machine": {}, "single": [{"impl": "c", "queue_bytes": 0, "reps": 1, "phases": {},
                                          "verified": True}], "batch": [], "lock": [], "gap": []})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert report.main([str(bad)]) == 1


def test_statistics() -> None:
    assert p99(list(range(1, 101))) == 99
    assert p99([5.0, 1.0, 3.0]) == 5.0
    entry = single_from_samples("x", 0, {"read_state": [1.0, 2.0, 30.0], "restore": [10.0, 10.0, 10.0]}, True)
    # the total is the statistic of per-cycle sums, not the sum of per-phase medians
    assert entry["total"] == {"median_us": 12.0, "p99_us": 40.0}
    with pytest.raises(ResultsError, match="unknown phases"):
        single_from_samples("x", 0, {"thaw": [1.0]}, True)


def _raw(**overrides: object) -> dict:
    entry = {"queue_bytes": 4096, "reps": 2, "verified": True, "inq_bytes_min": 4096, "outq_bytes_min": 4096,
             "error": None, "samples_ns": {"read_state": [1000, 3000], "close": [500, 500], "restore": [2000, 2000]}}
    entry.update(overrides)
    return {"impl": "c", "buffers": "fresh", "phases": ["read_state", "close", "restore"], "single": [entry],
            "batch": [{"connections": 100, "reps": 1, "verified": True, "error": None,
                       "samples_ns": {"read_state": [1_000_000], "close": [500_000], "restore": [2_500_000]}}]}


def test_c_reference_output_becomes_result_entries() -> None:
    parsed = cref.parse(_raw())
    single, = parsed["single"]
    assert single["impl"] == "c" and single["verified"]
    assert single["phases"]["read_state"] == {"median_us": 2.0, "p99_us": 3.0}
    assert single["total"]["median_us"] == 4.5
    batch, = parsed["batch"]
    assert batch["seconds"] == pytest.approx(0.004) and batch["conn_per_s"] == pytest.approx(25_000)
    assert not batch["with_lock"]


def test_c_reference_names_its_variant() -> None:
    raw = _raw()
    raw["impl"] = "c-options"
    parsed = cref.parse(raw)
    assert [e["impl"] for e in parsed["single"] + parsed["batch"]] == ["c-options", "c-options"]


def test_each_c_variant_runs_what_it_measures(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(binary, variant, sizes, reps, batches, batch_reps, timeout):
        calls.append((variant.impl, variant.flags, list(sizes), list(batches)))
        return {"single": [variant.impl], "batch": []}

    monkeypatch.setattr(cref, "_run_variant", fake)
    out = cref.run(Path("/x/repair_cycle"), [0, 4096, 1 << 20], 5, [100], batch_reps=1)
    assert calls == [("c", (), [0, 4096, 1 << 20], [100]), ("c-warm", ("--warm",), [4096, 1 << 20], []),
                     ("c-options", ("--options",), [0], [100])]
    assert out["single"] == ["c", "c-warm", "c-options"]
    calls.clear()
    cref.run(Path("/x/repair_cycle"), [0], 5, [], batch_reps=1)  # nothing for the warm C to measure: not run
    assert [impl for impl, *_ in calls] == ["c", "c-options"]


def test_c_reference_with_emptier_queues_than_asked_is_void() -> None:
    single, = cref.parse(_raw(outq_bytes_min=1024))["single"]
    assert not single["verified"]
    assert "held only 1024 of 4096 bytes" in single["error"]


def test_c_reference_command_line() -> None:
    argv = cref.argv(Path("/x/repair_cycle"), [0, 65536], 5, [100], batch_reps=1, flags=cref.WARM.flags)
    assert argv == ["/x/repair_cycle", "--sizes", "0,65536", "--reps", "5", "--block", "10", "--batches", "100",
                    "--batch-reps", "1", "--warm"]
    assert cref.argv(Path("/x/repair_cycle"), [0], 5, [], flags=cref.OPTIONS.flags)[-1] == "--options"


def test_no_compiler_gives_none_and_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    notes: list[str] = []
    assert cref.build(tmp_path / "out", notes) is None
    assert notes == [cref.NO_COMPILER_NOTE]


def test_image_share_is_reported() -> None:
    results = synthetic()
    results["single"][-1] = _single("sockrepair", 1 << 20, 600.0, 150.0, 850.0, serialize=150.0, deserialize=250.0)
    md = report.markdown(check(json.loads(json.dumps(results))))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    share = rows["Image encode + decode, 1 MiB queues: share of sockrepair's cycle"]
    # (150 + 250) us of a 2 ms cycle: 20%, twice the 10% limit
    assert "| 20.0% | missed by 10.0% (100%) |" in share
    assert "serialize 150.0 µs, deserialize 250.0 µs of a 2.00 ms cycle" in share
    # where the 1 MiB time goes: every phase, the largest first, next to the warm C's
    mib = rows["One connection, 1 MiB queues: sockrepair / warm C"]
    assert "restore 850.0 µs (42% of the cycle), warm C 250.0 µs; read_state 600.0 µs (30% of the cycle)" in mib


def _blocked(results: Results, reps: int = 100, block: int | None = 10) -> Results:
    """The synthetic run's single entries with `reps` cycles each, run in blocks of `block` (None: rep by rep)."""
    for i, e in enumerate(results["single"]):
        samples = {p: [s["median_us"]] * reps for p, s in e["phases"].items()}
        results["single"][i] = single_from_samples(e["impl"], e["queue_bytes"], samples, True, block=block)
    return results


def _check(queue: int, c_impl: str, python_us: float, c_us: float, reps: int = 100, verified: bool = True,
           block: int | None = 10) -> Independent:
    entry: Independent = {"queue_bytes": queue, "c_impl": c_impl, "reps": reps, "python_us": python_us, "c_us": c_us,
                          "ratio": python_us / c_us, "python_phases_us": {"read_state": python_us / 2},
                          "c_phases_us": {"read_state": c_us / 2}, "verified": verified,
                          "error": None if verified else "wrong byte"}
    if block is not None:
        entry["block"] = block
    return entry


def _agreement(results: Results, entry: Independent) -> report.Agreement:
    return report.agreement(entry, report._single(results, "sockrepair", entry["queue_bytes"]),
                            report._single(results, entry["c_impl"], entry["queue_bytes"]))


def test_the_check_agrees_within_the_tolerance() -> None:
    results = _blocked(synthetic())
    # bench 30 / 24 us = 1.25x like-for-like; the check 33 / 24 = 1.375x: 1.1x apart, within 1.25x
    a = _agreement(results, _check(0, "c-options", 33.0, 24.0))
    assert (a.bench_ratio, a.agrees, a.why) == (1.25, True, "")
    # exactly the tolerance apart still agrees; a hair beyond does not
    assert _agreement(results, _check(0, "c-options", 30.0 * 1.25, 24.0)).agrees is True
    assert _agreement(results, _check(0, "c-options", 30.0 * 1.26, 24.0)).agrees is False


def test_a_disagreement_says_which_cycle_moved() -> None:
    results = _blocked(synthetic())
    # bench 2 ms / 500 us = 4.00x warm C; the check 1.25 ms / 500 us = 2.50x: 1.6x apart
    a = _agreement(results, _check(1 << 20, "c-warm", 1250.0, 500.0))
    assert a.agrees is False and a.bench_ratio == 4.0
    assert a.why == ("the bench's Python cycle takes 1.60x the check's (2.00 ms against 1.25 ms), its C cycle 1.00x "
                     "(500.0 µs against 500.0 µs)")


def test_a_bench_run_rep_by_rep_is_named_as_the_cause() -> None:
    results = _blocked(synthetic(), block=None)  # a run saved before the blocks
    a = _agreement(results, _check(0, "c-options", 15.0, 24.0))
    assert a.agrees is False
    assert a.why.endswith("; run rep by rep, not in blocks (the bench's sockrepair, its C): a cycle started with "
                          "caches cooled by another one's megabytes")
    other = _blocked(synthetic(), block=5)
    assert _agreement(other, _check(0, "c-options", 15.0, 24.0)).why.endswith("; their blocks differ in length")


def test_the_check_is_not_judged_without_enough_verified_cycles() -> None:
    results = _blocked(synthetic())
    few = _agreement(results, _check(0, "c-options", 30.0, 24.0, reps=10))
    assert (few.agrees, few.why) == (None, "too few cycles to judge (10, at least 50 needed)")
    bad = _agreement(results, _check(0, "c-options", 30.0, 24.0, verified=False))
    assert (bad.agrees, bad.why) == (None, "not verified: the check")
    results["single"] = [e for e in results["single"] if e["impl"] != "c-warm"]
    none = _agreement(results, _check(1 << 20, "c-warm", 1250.0, 500.0))
    assert none.agrees is None and math.isnan(none.bench_ratio)
    assert none.why == "the bench has no 1 MiB entry of warm C"


def test_the_independent_check_section_shows_each_verdict() -> None:
    results = _blocked(synthetic())
    results["independent"] = [_check(1 << 20, "c-warm", 1250.0, 500.0), _check(0, "c-options", 33.0, 24.0)]
    md = report.markdown(check(json.loads(json.dumps(results))))
    assert "## Independent check" in md and "within 1.25x of each other" in md
    mib = next(line for line in md.splitlines() if line.startswith("| 1 MiB | warm C |"))
    assert "| 2.50x | 4.00x | **no**: the bench's Python cycle takes 1.60x the check's" in mib
    zero = next(line for line in md.splitlines() if line.startswith("| 0 B | like-for-like C |"))
    assert "| 1.38x | 1.25x | yes | read state 16.5 µs | 100 | yes |" in zero


def test_the_targets_give_their_issues_and_the_independent_checks_ratio_beside_the_benchs() -> None:
    results = _blocked(synthetic())
    results["independent"] = [_check(1 << 20, "c-warm", 1250.0, 500.0), _check(0, "c-options", 33.0, 24.0)]
    md = report.markdown(check(json.loads(json.dumps(results))))
    assert "| target | issue | limit | measured | status | independent check | where the time goes |" in md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    # bench 1.25x, check 1.38x: they agree; bench 4.00x, check 2.50x: they do not
    assert "| 13 | ≤ 1.50x | 1.25x | met | 1.38x: agrees |" in rows[
        "One connection, 0 B, no lock: sockrepair / like-for-like C"]
    assert "| 6, 13 | ≤ 1.30x | 4.00x | missed by 2.70x (208%) | 2.50x: does not agree |" in rows[
        "One connection, 1 MiB queues: sockrepair / warm C"]
    assert "| 6, 13 | ≥ 30,000 conn/s | 20,000 conn/s | missed by 10,000 conn/s (33%) | — |" in rows[
        "10,000 connections including the lock"]
    assert "| 13 | ≤ 10.0% |" in rows["Image encode + decode, 1 MiB queues: share of sockrepair's cycle"]
    del results["independent"]
    md = report.markdown(check(json.loads(json.dumps(results))))
    assert "| 1.25x | met | not run |" in md


def test_blocks_are_read_from_the_c_reference_and_kept_when_merged() -> None:
    raw = _raw()
    raw["block"] = 10
    single, = cref.parse(raw)["single"]
    assert single["block"] == 10
    assert "block" not in cref.parse(_raw())["single"][0]  # an older program: rep by rep
    halves = [single, cref.parse(raw)["single"][0]]
    merged, = merge_single(halves)
    assert merged["block"] == 10 and merged["reps"] == 4
    del halves[1]["block"]
    assert "block" not in merge_single(halves)[0]


def test_load_of_a_missing_or_damaged_file_is_a_benchmark_error_naming_the_report(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="cannot read") as missing:
        report.load(tmp_path / "absent.json")
    assert missing.value.part == "report"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BenchmarkError, match="is not JSON: .* at line 1") as damaged:
        report.load(tmp_path / "bad.json")
    assert damaged.value.part == "report"


def test_the_cross_host_part_is_judged_against_the_same_targets(tmp_path: Path) -> None:
    results = synthetic()
    long_move = {"freeze": 1.0, "checkpoint": 90.0, "restore": 60.0, "deliver": 20.0, "handoff": 12.0}
    results["gap"] = [
        _requests("sockrepair", 1, 2.5, 0, downtime_ms=7.0),
        _requests("sockrepair", 100, 15.0, 0),
        _requests("sockrepair-crosshost", 1, 1.8, 0),
        _requests("sockrepair-crosshost", 100, 35.0, 1, downtime_ms=30.0),
        _requests("sockrepair-crosshost", 1000, 340.0, 1296, downtime_ms=211.0, phases_ms=long_move,
                  later_ms=230.0),
    ]
    md = report.markdown(results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    # the same-host targets read the same-host entries only
    assert "| 15.0 ms | met |" in rows["Worst request latency across a move, 100 connections"]
    assert "| 1.8 ms | met |" in rows["Worst request latency across a move between hosts, 1 connection"]
    assert "missed by 15.0 ms (75%)" in rows["Worst request latency across a move between hosts, 100 connections"]
    # a move shorter than 200 ms: a request that waited that long was resent, nothing else to say
    hundred = rows["Requests waiting 200 ms or more across a move between hosts, 100 connections"]
    assert "| 1 request | missed by 1 request |" in hundred and "the move itself" not in hundred
    # a move of 200 ms or more: the requests caught in it waited that long, and its phases say where it went
    thousand = rows["Requests waiting 200 ms or more across a move between hosts, 1,000 connections"]
    assert "1,296 of 3,000 requests over 3 run(s)" in thousand
    assert ("the move itself took 223.00 ms (medians of the runs; freeze to unlock 211.00 ms: checkpoint 90.00 ms, "
            "restore 60.00 ms, deliver 20.00 ms; handoff 12.00 ms): a request caught in it waited that long without "
            "any retransmission, and requests due after it waited up to 230.00 ms behind the answers it held "
            "back") in thousand
    assert "more waiting at the peer" not in thousand
    # a worst request shorter than the move: most runs had no request inside it
    assert ("freeze to unlock 7.00 ms: restore 400.0 µs, freeze 300.0 µs, deliver 100.0 µs; the worst request shorter "
            "than the move: in most runs no request was sent while it lasted (the worst of the runs 2.75 ms)") in rows[
        "Worst request latency across a move, 1 connection"]
    # the median move under 200 ms, one run's over it: that run's requests waited inside it, and the report says so
    one_long = _requests("sockrepair", 1000, 220.0, 594, downtime_ms=192.7, phases_ms={**long_move, "handoff": 6.7},
                         longest_move_ms=291.0)
    assert report._long_move_where(one_long).startswith(
        "the longest move of the runs took 291.00 ms (the median 199.40 ms: freeze to unlock 192.70 ms")
    assert report._long_move_where(one_long).endswith("a request caught in it waited that long without any "
                                                      "retransmission")
    assert report._long_move_where({**one_long, "phases_ms": {"handoff": 1.0}, "longest_move_ms": 199.0}) == ""
    # no move time: nothing said of it
    assert report._long_move_where(_requests("sockrepair", 1000, 240.0, 5, downtime_ms=math.nan)) == ""
    assert "not measured" in rows["Requests waiting 200 ms or more across a move, 1,000 connections"]
    assert {"rto-crosshost-100", "rto-crosshost-1000", "gap-crosshost-100", "gap-crosshost-1000"} <= set(
        report.missed(results))
