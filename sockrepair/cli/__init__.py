"""The `sockrepair` command: parsing arguments and printing results only; the work lives in the library packages,
none of which imports this one."""

from sockrepair.cli.main import main

__all__ = ["main"]
