"""The stage table: migrate() and dump() report only stages declared there, under the keys reports always had."""

from __future__ import annotations

import time

import pytest

from sockrepair.move.stages import Stage, Timings


def _keys(job: str) -> list[str]:
    return [stage.key for stage in Stage if job in stage.jobs]


def test_the_table_keeps_the_report_keys_in_run_order() -> None:
    assert _keys("migrate") == ["freeze", "lock", "checkpoint", "serialize", "journal", "close", "network",
                                "restore", "deliver", "unlock", "handoff"]
    assert _keys("dump") == ["freeze", "lock", "checkpoint", "write", "resume", "kill", "keep"]
    assert _keys("restore") == ["load", "restore", "deliver", "unlock", "handoff"]
    assert all(stage.does and stage.jobs for stage in Stage)
    assert all(stage.value == stage.key for stage in Stage)


def test_an_unknown_stage_is_refused() -> None:
    timings = Timings("migrate")
    with pytest.raises(TypeError, match="not a stage"), timings.timed("frobnicate"):  # type: ignore[arg-type]
        pass
    with pytest.raises(TypeError), timings.timed("freeze"):  # type: ignore[arg-type]
        pass
    assert timings.ms == {}


def test_a_stage_of_the_other_job_is_refused() -> None:
    with pytest.raises(ValueError, match="dump has no stage 'serialize'"), Timings("dump").timed(Stage.SERIALIZE):
        pass
    with pytest.raises(ValueError, match="migrate has no stage 'write'"), Timings("migrate").timed(Stage.WRITE):
        pass


def test_timings_add_up_and_keep_run_order_even_on_errors() -> None:
    timings = Timings("migrate")
    with timings.timed(Stage.FREEZE):
        time.sleep(0.002)
    with timings.timed(Stage.LOCK):
        pass
    first_lock = timings.ms["lock"]
    with pytest.raises(RuntimeError), timings.timed(Stage.LOCK):
        time.sleep(0.002)
        raise RuntimeError
    assert list(timings.ms) == ["freeze", "lock"]
    assert timings.ms["freeze"] >= 2 and timings.ms["lock"] >= first_lock + 2
