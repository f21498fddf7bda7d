"""Holding signals back (pthread_sigmask) while a step that must not be cut in half runs: the end of a move, a fork
whose child sets its own handlers before it takes them."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator

# what a terminal (to the whole process group) or a service manager sends to end sockrepair
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def deferred_signals(signals: Iterable[int] = ENDING) -> Iterator[set[int | signal.Signals]]:
    """Block `signals` (default ENDING) in the calling thread for the block; yields the mask from before, which a
    child forked inside sets again itself once its handlers are in place. Those that arrived meanwhile are delivered,
    and their handlers (KeyboardInterrupt...) run, as the block ends, however it ends."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield before
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
