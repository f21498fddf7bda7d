"""argparse value types shared by the subcommands: bad values become usage errors (exit 2), never tracebacks."""

from __future__ import annotations

import argparse
import math

from sockrepair.lock.locker import MAX_TTL
from sockrepair.state import ConnTuple


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


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"want a positive number of seconds, not {text}")
    return value
