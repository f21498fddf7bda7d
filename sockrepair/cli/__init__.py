"""The `sockrepair` command: parsing arguments and printing results only; the work lives in the library packages,
none of which imports this one."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: sockrepair.cli.main.main (its exit status), loaded here, where importing the package
    (lazy, sockrepair/__init__.py) has cost milliseconds only, so that a Ctrl-C while the command's modules load (a
    few hundred ms) is one line and exit 130, as in a command, never an import's KeyboardInterrupt traceback."""
    try:
        from sockrepair.cli.main import main as run
    except KeyboardInterrupt:
        print("sockrepair: interrupted", file=sys.stderr)
        return 130
    return run(argv)


__all__ = ["main"]
