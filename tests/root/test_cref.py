"""The C reference builds, runs in its own namespace and proves it delivered every byte after each cycle."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockrepair.bench import cref

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    notes: list[str] = []
    built = cref.build(tmp_path_factory.mktemp("cref"), notes)
    if built is None:
        pytest.skip(notes[0])
    return built


def test_quick_run_verifies_every_byte(binary: Path) -> None:
    out = cref.run(binary, sizes=[0, 65536], reps=5, batches=[100], batch_reps=1, timeout=120)
    assert [(e["queue_bytes"], e["reps"]) for e in out["single"]] == [(0, 5), (65536, 5)]
    for entry in out["single"]:
        assert entry["verified"], entry.get("error")
        assert entry["impl"] == "c"
        assert set(entry["phases"]) == {"read_state", "close", "restore"}
        assert entry["total"]["median_us"] > 0
    batch, = out["batch"]
    assert batch["verified"], batch.get("error")
    assert batch["connections"] == 100 and batch["reps"] == 1
    assert batch["conn_per_s"] > 0


def test_bad_arguments_fail_with_one_line(binary: Path) -> None:
    with pytest.raises(cref.CReferenceError, match="the C reference failed: repair_cycle: a batch needs at least one connection"):
        cref.run(binary, sizes=[0], reps=1, batches=[0], batch_reps=1, timeout=60)
