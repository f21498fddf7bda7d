"""The `sockrepair` command: parsing arguments and printing results only; the work lives in the library packages,
none of which imports this one."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The console script's entry point: sockrepair.cli.main.main. Imported when called, so that `python -m
    sockrepair.cli.main` does not find its own module already imported by this package (runpy warns then)."""
    from sockrepair.cli.main import main as run

    return run(argv)


__all__ = ["main"]
