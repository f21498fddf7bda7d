"""Running the CLI in-process, as `sockrepair` would, capturing what it prints: one command group (run_group) or
the whole command with its error handling (run_main)."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable
from typing import Any

from sockrepair.cli.main import main


def run_group(add_commands: Callable[[Any], None], *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="sockrepair")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = args.func(args)
    return code, out.getvalue()


def run_main(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `sockrepair ARGV...`; argparse's usage errors give their status (2), any
    other exception escapes: a traceback is a test failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()
