"""sockrepair.sigmask.deferred_signals: the signals it holds back wait until the block ends, then their handlers run;
the mask is what it was before, even when the block raises."""

from __future__ import annotations

import os
import signal

import pytest

from sockrepair.sigmask import ENDING, deferred_signals


def _mask() -> set[int]:
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])}


def test_a_signal_sent_inside_is_handled_once_the_block_ends() -> None:
    seen: list[str] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signal.Signals(signum).name))
    before = _mask()
    try:
        with deferred_signals() as outside:
            assert {int(s) for s in outside} == before
            assert _mask() == before | {int(s) for s in ENDING}
            os.kill(os.getpid(), signal.SIGHUP)
            seen.append("sent")
            assert signal.SIGHUP in signal.sigpending()
        assert _mask() == before
        assert seen == ["sent", "SIGHUP"]
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_the_mask_comes_back_when_the_block_raises() -> None:
    before = _mask()
    with pytest.raises(RuntimeError), deferred_signals([signal.SIGUSR2]):
        assert _mask() == before | {int(signal.SIGUSR2)}
        raise RuntimeError("cut")
    assert _mask() == before
