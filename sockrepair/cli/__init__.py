"""The `sockrepair` command: parsing arguments and printing results only; the work lives in the library packages,
none of which imports this one."""

from __future__ import annotations

import signal
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: sockrepair.cli.main.main (its exit status), loaded here so that a Ctrl-C while the
    command's modules load (a few hundred ms) ends it by the signal, as before any work began, instead of printing
    an import's KeyboardInterrupt traceback."""
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    from sockrepair.cli.main import main as run

    signal.signal(signal.SIGINT, previous)
    return run(argv)


__all__ = ["main"]
