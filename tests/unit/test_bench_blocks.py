"""Single-connection cycles run warm in every harness: blocks of consecutive cycles of one size, each after an untimed
cycle of that size, sizes interleaved block by block (bench_engine.run_single, with the C reference's round after each
of its rounds; independent.measure, Python and C alternating block by block). The cycles are replaced by recorders:
what is checked is the order of the cycles and which are timed, never a time."""

from __future__ import annotations

from typing import Any

import pytest

from sockrepair.bench import bench_engine, independent

BIG = 16 << 20
PHASES = {"read_state": 1.0, "serialize": 1.0, "close": 1.0, "deserialize": 1.0, "restore": 1.0}


def test_the_bench_runs_blocks_of_one_size_after_an_untimed_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, int]] = []

    def cycle(q: int, to_peer: bytes, to_sock: bytes) -> tuple[dict[str, float], int]:
        order.append(("cycle", q))
        return dict(PHASES), q

    monkeypatch.setattr(bench_engine, "_single_cycle", cycle)
    monkeypatch.setattr(bench_engine, "_stream", lambda salt, length: b"")
    out = bench_engine.run_single([0, BIG], reps=5, big_reps=2, block=3,
                                  between=lambda n: order.append(("between", n)))
    # round 1: 0 B (warm-up + 3), 16 MiB (warm-up + 2: its big_reps), then C's round; round 2: 0 B (warm-up + 2)
    assert order == [*[("cycle", 0)] * 4, *[("cycle", BIG)] * 3, ("between", 3),
                     *[("cycle", 0)] * 3, ("between", 2)]
    assert [(e["queue_bytes"], e["reps"], e["block"], e["verified"]) for e in out] == [(0, 5, 3, True),
                                                                                     (BIG, 2, 3, True)]


def test_the_independent_check_alternates_python_and_c_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, int]] = []

    def python(q: int, to_peer: bytes, to_sock: bytes, mark: Any = None) -> dict[str, float]:
        order.append(("python", q))
        return {p: 2.0 for p in independent.PYTHON_PHASES}

    def c(lib: Any, q: int, options: bool, to_peer: bytes, to_sock: bytes, mark: Any = None) -> dict[str, float]:
        order.append(("c-options" if options else "c", q))
        return {p: 1.0 for p in independent.C_PHASES}

    monkeypatch.setattr(independent, "_load", lambda library: None)
    monkeypatch.setattr(independent, "_stream", lambda salt, length: b"")
    monkeypatch.setattr(independent, "_python_cycle", python)
    monkeypatch.setattr(independent, "_c_cycle", c)
    out = independent.measure(None, [0, 4096], reps=4, block=2)  # type: ignore[arg-type]
    block = lambda who, q: [(who, q)] * 3  # noqa: E731 - the untimed cycle, then the block of 2
    assert order == [*block("python", 0), *block("c-options", 0), *block("python", 4096), *block("c", 4096),
                     *block("c-options", 0), *block("python", 0), *block("c", 4096), *block("python", 4096)]
    assert [(e["queue_bytes"], e["c_impl"], e["reps"], e["ratio"], e["block"]) for e in out] == [
        (0, "c-options", 4, 10.0 / 3.0, 2), (4096, "c-warm", 4, 10.0 / 3.0, 2)]
