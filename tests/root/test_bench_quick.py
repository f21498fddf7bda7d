"""`sockrepair bench --quick` end to end, as CI runs it: every part ran, every variant moved its bytes intact, the
report and plots were written, and nothing was left behind (namespaces, processes). Never how fast."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sockrepair.bench import run_all
from sockrepair.bench.results import (
    C_IMPL,
    C_OPTIONS_IMPL,
    C_WARM_IMPL,
    SINGLE_BLOCK,
    SOCKREPAIR_IMPL,
)
from sockrepair.criu.locate import find_criu
from sockrepair.errors import CriuError
from sockrepair.lab.programs import CLIENT, ECHO_SERVER, RECEIVER
from tests.root.conftest import leaked_namespaces, namespaces

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
SIZES = {0, 4 << 10, 64 << 10, 1 << 20, 16 << 20}


def _helpers() -> set[int]:
    """Processes running the benchmark's helper programs (the echo program, the client, the receiver)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if any(str(program).encode() in cmd for program in (CLIENT, ECHO_SERVER, RECEIVER)):
            found.add(int(pid))
    return found


def _criu_works() -> bool:
    try:
        return find_criu().check().ok
    except CriuError:
        return False


def test_quick_bench_runs_every_variant_and_verifies_its_bytes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the benchmarks need root")
    before_ns, before_procs = namespaces(), _helpers()
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "sockrepair.bench.run_all", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== peer-seen gap" in done.stderr  # progress while running
    results = json.loads((out / "results.json").read_text())
    notes = results["notes"]

    single = {(e["impl"], e["queue_bytes"]): e for e in results["single"]}
    assert {q for impl, q in single if impl == C_IMPL} == SIZES
    if run_all.engine_module() is not None:
        assert {q for impl, q in single if impl == SOCKREPAIR_IMPL} == SIZES
    else:
        assert any("bench_engine.py is missing" in n for n in notes)
    batch = {(e["impl"], e["connections"]) for e in results["batch"]}
    assert {("c", 1), ("c", 10000), ("sockrepair-process", 1), ("sockrepair-process", 100)} <= batch
    assert {e["method"] for e in results["lock"]} >= {"sockrepair"}
    gaps = {e["impl"] for e in results["gap"]}
    assert {SOCKREPAIR_IMPL, "sockrepair-crosshost"} <= gaps
    if _criu_works():
        assert {"criu-nftables", "criu-iptables", "criu-nftables-crosshost"} <= gaps
    else:
        assert any("criu variants of the peer-gap" in n for n in notes)
        assert any("criu variants of the cross-host" in n for n in notes)
    crosshost = next(e for e in results["gap"] if e["impl"] == "sockrepair-crosshost")
    assert crosshost["wire_gap_ms"] is not None

    if run_all.engine_module() is not None:  # the engine part's independent check: both sizes, bytes verified
        assert {e["queue_bytes"] for e in results["independent"]} == {0, 1 << 20}
        # every harness ran its single-connection cycles in the same blocks, warm
        assert {e.get("block") for e in [*results["single"], *results["independent"]]} == {SINGLE_BLOCK}
        if shutil.which("strace"):  # one traced cycle of each side, at both sizes
            counted = {(e["impl"], e["queue_bytes"]): e["total"] for e in results["syscalls"]}
            assert set(counted) == {(SOCKREPAIR_IMPL, 0), (C_OPTIONS_IMPL, 0), (SOCKREPAIR_IMPL, 1 << 20),
                                    (C_WARM_IMPL, 1 << 20)}
            assert all(counted.values())
            assert "## System calls per cycle" in (out / "results.md").read_text()
    for section in ("single", "batch", "gap", "independent"):
        for e in results[section]:
            assert e["verified"], f"{section} {e['impl']}: {e.get('error')}"
            assert e.get("reps", e.get("runs", 0)) > 0

    for name in ("results.json", "results.md", "latency_by_phase.png", "latency_vs_queue.png",
                 "batch_conn_per_s.png", "peer_gap.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "## Targets (issues 6, 11 and 13)" in md and results["machine"]["kernel"] in md
    assert "## Independent check" in md

    assert leaked_namespaces(before_ns) == set()
    assert _helpers() <= before_procs
