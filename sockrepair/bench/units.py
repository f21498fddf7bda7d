"""Numbers as people read them: byte sizes in KiB/MiB, durations in the unit that fits, counts with separators."""

from __future__ import annotations

import math


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def human_us(us: float | None) -> str:
    """A duration given in microseconds; "—" when it was not measured."""
    if us is None or math.isnan(us):
        return "—"
    if us < 1000:
        return f"{us:.1f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1_000_000:.2f} s"


def human_count(n: float) -> str:
    if n >= 1000 and n % 1000 == 0:
        return f"{int(n) // 1000}k" if n < 1_000_000 else f"{n / 1_000_000:g}M"
    return f"{n:,.0f}"


def connections(n: int) -> str:
    """"1 connection", "1,000 connections"."""
    return f"{n:,} connection{'' if n == 1 else 's'}"
