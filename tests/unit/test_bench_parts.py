"""The benchmark harness without measuring: how results of each part are shaped, merged, judged and explained."""

from __future__ import annotations

import argparse
import cProfile
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from sockrepair.bench import bench_crosshost, bench_gap, profiles, report, run_all
from sockrepair.bench.results import (
    check,
    empty,
    gap_from_runs,
    lock_entries,
    merge_single,
    single_from_samples,
)
from sockrepair.errors import NotPermittedError
from sockrepair.lab.programs.client import chunk
from sockrepair.lab.subjects import largest_gap_s


def test_lock_cases_become_lock_entries_with_the_reports_method_names() -> None:
    cases = {
        "sockrepair lock+unlock, 1 connection": {"n": 300, "median_us": 40.0, "p99_us": 90.0},
        "sockrepair lock 10,000 connections": {"n": 3, "median_us": 9000.0, "p99_us": 9500.0},
        "nft CLI lock+unlock, 1 connection": {"n": 10, "median_us": 20000.0, "p99_us": 30000.0},
        "iptables x4 as criu runs it (iptables v1.8.9 (nf_tables))": {"n": 5, "median_us": 4e4, "p99_us": 5e4},
        "libnftables lock+unlock, context reused": {"n": 100, "median_us": 600.0, "p99_us": 900.0},
        "libnftables lock+unlock, new context per call (criu)": {"n": 10, "median_us": 3e4, "p99_us": 8e4},
        "something new": {"n": 1, "median_us": 1.0, "p99_us": 1.0},
    }
    methods = [e["method"] for e in lock_entries(cases)]
    assert methods == ["sockrepair", "sockrepair: lock 10,000 connections", "nft CLI", "iptables (criu)",
                       "libnftables", "libnftables, new context per call (criu)", "something new"]
    results = empty({})
    results["lock"] = lock_entries(cases)
    target = next(t for t in report.TARGETS if t.key == "lock")
    assert report.judge(target, target.measure(results)) == "met"


def test_two_series_of_the_c_reference_merge_into_one_entry_over_all_cycles() -> None:
    first = single_from_samples("c", 0, {"read_state": [1.0, 2.0], "close": [1.0, 1.0]}, verified=True)
    second = single_from_samples("c", 0, {"read_state": [3.0], "close": [1.0]}, verified=False, error="short")
    other = single_from_samples("c", 4096, {"read_state": [5.0], "close": [1.0]}, verified=True)
    merged = {e["queue_bytes"]: e for e in merge_single([first, other, second])}
    assert merged[0]["reps"] == 3 and merged[0]["phases"]["read_state"]["median_us"] == 2.0
    assert merged[0]["verified"] is False and merged[0]["error"] == "short"
    assert merged[4096]["reps"] == 1 and merged[4096]["verified"]


def test_gap_entries_keep_the_phases_and_fail_with_the_first_error() -> None:
    ok = gap_from_runs("sockrepair", 1, [3.0, 5.0, 4.0], True, None, [2.0, 2.5, 3.0],
                       [{"freeze": 0.5, "restore": 1.0}, {"freeze": 0.7, "restore": 1.2, "handoff": 0.1}])
    assert ok["gap_ms"] == 4.0 and ok["max_gap_ms"] == 5.0 and ok["verified"]
    assert ok["downtime_ms"] == 2.5 and ok["phases_ms"] == {"freeze": 0.6, "restore": 1.1, "handoff": 0.1}
    assert "longest_move_ms" not in ok  # one run without its phases: not every move is known
    moves = gap_from_runs("sockrepair", 1000, [210.0, 220.0, 290.0], True, None, [190.0, 195.0, 250.0],
                          [{"handoff": 5.0}, {"handoff": 7.0}, {"handoff": 6.0}])
    assert moves["downtime_ms"] == 195.0 and moves["longest_move_ms"] == 256.0
    none = gap_from_runs("criu-nftables", 1000, [], False, "criu dump failed: select")
    assert math.isnan(none["gap_ms"]) and not none["verified"] and none["error"].startswith("criu dump")
    results = empty({})
    results["gap"] = [ok, none]
    check(results)


def test_a_missed_gap_says_where_the_time_went() -> None:
    entry = gap_from_runs("sockrepair", 1, [250.0], True, None, [10.0],
                          [{"freeze": 1.0, "untimed": 7.0, "restore": 2.0, "handoff": 0.5}])
    where = report.gap_where(entry)
    assert where.startswith("freeze to unlock 10.00 ms: untimed 7.00 ms, restore 2.00 ms, freeze 1.00 ms")
    assert "handoff 500.0 µs" in where and "239.50 ms more waiting at the peer" in where
    results = empty({})
    results["gap"] = [entry]
    assert report.missed(results) == ["gap-1"]


def test_runs_are_interleaved_run_by_run() -> None:
    plan = bench_gap.Plan({"requests": {"sockrepair": {1: 2, 100: 1}, "criu-nftables": {1: 1}},
                           "stream": {"sockrepair": {1: 1}}}, 0.0, 0.0)
    order = bench_gap._schedule(plan, ["sockrepair", "criu-nftables"], None)
    assert order == [("requests", "sockrepair", 1), ("requests", "criu-nftables", 1), ("requests", "sockrepair", 100),
                     ("stream", "sockrepair", 1), ("requests", "sockrepair", 1)]
    assert bench_gap._schedule(plan, ["sockrepair"], [100]) == [("requests", "sockrepair", 100)]
    assert bench_gap._schedule(plan, ["sockrepair"], None, ["stream"]) == [("stream", "sockrepair", 1)]


def test_every_variant_and_count_of_the_issue_is_planned_and_quick_stays_small() -> None:
    # issue 11: both peer workloads, every variant, N = 1, 100 and 1,000, in the gap part and the cross-host part
    variants = {"sockrepair", "sockrepair-droplock", "criu-nftables", "criu-iptables"}
    for workload in ("requests", "stream"):
        full = bench_gap.FULL.runs[workload]
        assert set(full) == variants, workload
        assert all(set(counts) == {1, 100, 1000} for counts in full.values()), workload
        crosshost = {impl: counts for (w, impl), counts in bench_crosshost.FULL.runs.items() if w == workload}
        assert set(crosshost) == {f"{v}-crosshost" for v in variants}, workload
        assert all(set(counts) == {1, 100, 1000} for counts in crosshost.values()), workload
    quick = bench_gap._schedule(bench_gap.QUICK, bench_gap.VARIANTS, None)
    assert {n for _, _, n in quick} == {1, 10} and len(quick) <= 12
    # the whole load stays at 5,000 requests/s: 20 ms per connection up to 100 connections, then longer
    assert bench_gap.request_interval(1) == bench_gap.request_interval(100) == 0.02
    assert bench_gap.request_interval(1000) == 0.2


def test_the_move_ends_after_its_freeze_not_after_the_calls_start() -> None:
    # migrate() set up for 30 ms before it froze; its downtime and handoff took 8 ms: a request due at +32 ms waited
    # inside the move, not after it (counted from the call's start, the move "ended" at +8 ms)
    began = 100.0
    report_ = {"mode": "requests", "requests": 300, "over_200ms": 0, "errors": [], "swept": True,
               "worst": [100.005, 0.010], "pauses": [], "longest_pause": [0.0, 0.0], "ports": [5000],
               "slow": [[99.5, 0.0012, 0], [100.005, 0.010, 0], [100.032, 0.006, 0], [100.05, 0.0015, 0]]}
    moved = bench_gap.RunResult(None, None, 7.0, {"freeze": 0.5, "handoff": 1.0}, frozen_at=100.030)
    assert bench_gap.move_ended(moved, began) == pytest.approx(100.038)
    run = bench_gap._outcome(moved, report_, began)
    assert run.later_ms == pytest.approx(1.5)
    # the worst and the baseline still count from the call: a request the setup or a busy program's earlier
    # freezes slowed (answered at +15 ms, before the kept freeze) is the move's, not the machine's noise
    assert run.gap_ms == pytest.approx(10.0) and run.baseline_ms == pytest.approx(1.2)
    # criu's moves carry no freeze time: counted from the call's start
    assert bench_gap.move_ended(bench_gap.RunResult(None, None, 7.0, {"handoff": 1.0}), began) == pytest.approx(100.008)
    assert bench_gap.move_ended(bench_gap.RunResult(None, "failed"), began) is None


def test_a_request_run_counts_the_requests_that_waited_a_retransmission_timeout() -> None:
    began = 100.0
    report_ = {"mode": "requests", "requests": 500, "over_200ms": 2, "errors": [], "swept": True,
               "worst": [100.0005, 0.208], "pauses": [], "longest_pause": [0.0, 0.0], "ports": [5000, 5001, 5002],
               "slow": [[99.0, 0.004, 0], [100.0005, 0.208, 1], [100.001, 0.207, 2], [101.0, 0.003, 0]]}
    moved = bench_gap.RunResult(None, None, 1.5, {"freeze": 0.2}, kept=(0, 3), unacked=[5002])
    run = bench_gap._outcome(moved, report_, began)
    assert run.error is None and run.gap_ms == 208.0 and run.baseline_ms == 4.0
    assert run.over_200ms_unacked == 1  # the request on port 5002's connection
    assert run.later_ms == 3.0  # due after the move (1.5 ms) ended: noise, not the move
    assert (run.requests, run.over_200ms, run.kept) == (500, 2, (0, 3))
    stream = {"mode": "stream", "requests": 1, "over_200ms": 0, "errors": [], "swept": False,
              "pauses": [[99.5, 0.003, 0], [100.01, 0.05, 0]], "longest_pause": [100.01, 0.05], "slow": []}
    run = bench_gap._outcome(bench_gap.RunResult(None, None), stream, began)
    assert run.gap_ms == 50.0 and run.requests is None
    assert run.error == "the peer did not check every connection after the move"
    e = bench_gap.entry("sockrepair", 100, [bench_gap.RunResult(3.0, None, 1.0, {}, 400, 0, 2.0, (5, 0), 1.0, [], 0),
                                           bench_gap.RunResult(5.0, None, 1.2, {}, 450, 1, 4.0, (7, 1), 1.0, [1, 2],
                                                               1)],
                        "requests")
    assert (e["workload"], e["requests"], e["over_200ms"], e["kept_delivered"], e["kept_fell_back"]) == (
        "requests", 850, 1, 12, 1)
    assert e["restored_unacked"] == 2 and e["over_200ms_unacked"] == 1
    assert e["gap_ms"] == 4.0 and e["max_gap_ms"] == 5.0 and e["baseline_ms"] == 3.0 and e["interval_ms"] == 20.0


def test_the_gap_is_the_longest_round_trip_ending_after_the_move_began() -> None:
    report_ = {"rounds": 100, "slow": [[1.0, 0.5], [10.0, 0.02], [10.1, 0.004]], "slowest": [1.0, 0.5]}
    assert largest_gap_s(report_, since=10.005) == 0.02
    assert largest_gap_s({"rounds": 100, "slow": [], "slowest": [3.0, 0.0004]}, since=10.0) == 0.0004
    assert largest_gap_s({"rounds": 0, "slow": [], "slowest": None}, since=10.0) is None


def test_restored_sockets_holding_unacknowledged_output_are_named_by_the_peers_port() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tuples = [SimpleNamespace(remote_port=40001), SimpleNamespace(remote_port=40002)]
    with a, b:
        assert bench_gap.unacked_output([a, b], tuples) == []  # TIOCOUTQ: bytes the other end has not taken
        a.sendall(b"x")
        assert bench_gap.unacked_output([a, b], tuples) == [40001]


def test_each_round_of_each_connection_sends_different_bytes() -> None:
    assert len(chunk(3, 7, 64)) == 64
    assert len({chunk(c, s, 64) for c in range(20) for s in range(20)}) == 400


def test_profile_rows_are_per_cycle_and_name_the_functions() -> None:
    def work() -> int:
        return sum(i * i for i in range(20000))

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(4):
        work()
    profiler.disable()
    rows = profiles.rows(profiler, cycles=4, top=5)
    assert len(rows) <= 5
    mine = next(r for r in rows if r["function"].endswith("(work)") or "genexpr" in r["function"])
    assert mine["calls"] >= 4 and mine["cumulative_ms"] >= mine["own_ms"] >= 0
    assert all(" at 0x" not in r["function"] for r in rows)
    assert profiles.for_target("gap-100", quick=True) is not None
    assert profiles.for_target("no-such-target", quick=True) is None


def test_profiles_are_shown_under_the_targets(tmp_path: Path) -> None:
    results = empty({"cpu": "x"})
    results["profiles"] = {"gap-1": {"what": "migrate", "cycles": 1, "rows": [
        {"function": "capture.py:88(captured)", "calls": 1, "own_ms": 0.5, "cumulative_ms": 9.0}]}}
    md = report.markdown(results)
    assert "### Worst request latency across a move, 1 connection" in md and "`capture.py:88(captured)`" in md
    report.write(results, tmp_path)
    assert report.load(tmp_path / "results.json")["profiles"]["gap-1"]["rows"][0]["cumulative_ms"] == 9.0


def test_a_missing_engine_benchmark_is_a_note_not_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_all, "engine_module", lambda: None)
    monkeypatch.setattr(run_all.machine, "describe", lambda: {"cpu": "test"})
    monkeypatch.setattr(run_all.os, "geteuid", lambda: 0)
    results = run_all.run(quick=True, parts=["engine"], progress=lambda _text: None)
    assert results["single"] == [] and results["batch"] == []
    assert any("bench_engine.py is missing" in note for note in results["notes"])


def test_unknown_parts_and_no_root_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_all.os, "geteuid", lambda: 1000)
    with pytest.raises(run_all.NotPermittedError, match="need root"):
        run_all.run(parts=["gap"], progress=lambda _text: None)
    monkeypatch.setattr(run_all.os, "geteuid", lambda: 0)
    with pytest.raises(run_all.SockrepairError, match="unknown part"):
        run_all.run(parts=["nope"], progress=lambda _text: None)


def test_the_bench_subcommand_parses_as_the_benchmarks_do() -> None:
    import argparse

    from sockrepair.cli.bench import PARTS, add_bench_command, cmd_bench

    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    args = parser.parse_args(["bench", "--quick", "--out", "x", "--parts", "gap"])
    assert args.quick and args.out == Path("x") and args.parts == "gap" and not args.json
    assert args.func is cmd_bench
    assert set(args.parts.split(",")) <= set(run_all.PARTS)
    assert parser.parse_args(["bench"]).parts.split(",") == list(run_all.PARTS)
    assert PARTS == run_all.PARTS
    # every option run_all.run_from_args reads, with run_all's own defaults
    own = argparse.ArgumentParser()
    run_all.add_arguments(own)
    defaults = vars(parser.parse_args(["bench"]))
    del defaults["func"]
    assert defaults == vars(own.parse_args([]))


def test_a_refused_run_makes_no_out_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root the run is refused before --out is created (it was made, then the run refused)."""
    monkeypatch.setattr(run_all.os, "geteuid", lambda: 1000)
    out = tmp_path / "new"
    args = argparse.Namespace(out=out, parts="engine", quick=True, no_profiles=True, json=False)
    with pytest.raises(NotPermittedError):
        run_all.run_from_args(args)
    assert not out.exists()
