"""Running a CLI command group in-process, as `sockrepair` would, capturing what it prints."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable
from typing import Any


def run_group(add_commands: Callable[[Any], None], *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="sockrepair")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = args.func(args)
    return code, out.getvalue()
