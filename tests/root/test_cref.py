"""The C reference builds, runs in its own namespace and proves it delivered every byte after each cycle."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockrepair.bench import cref
from sockrepair.errors import BenchmarkError

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    notes: list[str] = []
    built = cref.build(tmp_path_factory.mktemp("cref"), notes)
    if built is None:
        pytest.skip(notes[0])
    return built


def test_quick_run_verifies_every_byte_in_every_variant(binary: Path) -> None:
    out = cref.run(binary, sizes=[0, 65536], reps=5, batches=[100], batch_reps=1, timeout=120)
    assert [(e["impl"], e["queue_bytes"], e["reps"]) for e in out["single"]] == [
        ("c", 0, 5), ("c", 65536, 5), ("c-warm", 65536, 5), ("c-options", 0, 5)]
    for entry in out["single"]:
        assert entry["verified"], (entry["impl"], entry.get("error"))
        assert set(entry["phases"]) == {"read_state", "close", "restore"}
        assert entry["total"]["median_us"] > 0
    assert [b["impl"] for b in out["batch"]] == ["c", "c-options"]
    for batch in out["batch"]:
        assert batch["verified"], (batch["impl"], batch.get("error"))
        assert batch["connections"] == 100 and batch["reps"] == 1
        assert batch["conn_per_s"] > 0


def test_options_and_warm_together_verify_every_byte(binary: Path) -> None:
    """Like-for-like options with warm buffers, on queues that hold data (TCP_NODELAY set, so restored): bytes and
    options both checked after every cycle."""
    both = cref.Variant("c-options-warm", ("--options", "--warm"), empty_queues=True, full_queues=True, batches=True)
    out = cref.run(binary, sizes=[0, 65536], reps=3, batches=[20], batch_reps=1, timeout=120, variants=[both])
    assert [(e["impl"], e["queue_bytes"]) for e in out["single"]] == [("c-options-warm", 0),
                                                                      ("c-options-warm", 65536)]
    for entry in out["single"] + out["batch"]:
        assert entry["verified"], entry.get("error")


def test_bad_arguments_fail_with_one_line(binary: Path) -> None:
    with pytest.raises(BenchmarkError, match="the C reference failed: repair_cycle: a batch needs at least one "
                       "connection") as info:
        cref.run(binary, sizes=[0], reps=1, batches=[0], batch_reps=1, timeout=60)
    assert info.value.part == cref.PART
