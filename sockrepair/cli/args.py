"""The command's argument parser and the value types its subcommands share: bad values become usage errors (one
line, exit 2), never tracebacks."""

from __future__ import annotations

import argparse
import pwd
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from sockrepair.cli.output import clip_echoes
from sockrepair.lock.locker import MAX_TTL
from sockrepair.state import ConnTuple


class Parser(argparse.ArgumentParser):
    """argparse's parser with a usage error as one line on stderr, `PROG: error: MESSAGE` (exit 2), without the
    usage block (`PROG --help` prints it), and the long arguments it quotes cut (output.clip_echoes).
    add_subparsers() makes each subcommand's parser of this class too."""

    _argv: Sequence[str] = ()

    # one signature for typeshed's three overloads (they only tell the namespace's type apart)
    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: Any = None) -> tuple[Any, list[str]]:
        # a subcommand's parser is given its own part of the command line: the part its errors quote
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {clip_echoes(message, self._argv)}\n")


def path_arg(text: str) -> Path:
    """A file or directory path; "" is refused (Path("") is ".", which nobody means)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file")
    return Path(text)


def socket_path_arg(text: str) -> str:
    """A UNIX socket path, as text; "" is refused as path_arg refuses it."""
    return str(path_arg(text))


def tuple_arg(text: str) -> ConnTuple:
    try:
        return ConnTuple.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ttl_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_TTL:
        raise argparse.ArgumentTypeError(f"ttl must be in (0, {MAX_TTL:g}] seconds, not {text}")
    return value


# a day: longer runs are no demo or timeout anyone means, and time arithmetic stays in range
MAX_SECONDS = 86400.0


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"want a number of seconds in (0, {MAX_SECONDS:g}], not {text}")
    return value


def netns_arg(text: str) -> str:
    """A name from `ip netns list`: never empty (that would mean the current namespace) and never a path."""
    if not text or "/" in text or text in (".", "..") or "\0" in text:
        raise argparse.ArgumentTypeError(f"not a network namespace name (see `ip netns list`): {text!r}")
    return text


def uid_arg(text: str) -> int:
    """A user id, as a number or a user name."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {text!r}") from None
