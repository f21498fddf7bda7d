"""System calls per cycle, sockrepair against the C reference: one cycle of each, of the independent check's kind
(sockrepair/bench/independent.py: one process, the C side called as a library), traced by strace after an untraced
warm-up, counted between two marker calls (close() of fd numbers no process holds) placed right around the timed
part. The counts say how many kernel round trips each cycle makes, and the socket option calls by level and name
show whether the like-for-like C reads and sets the same options as the engine.

    python -m sockrepair.bench.syscalls [--sizes 0,1048576]

The C side's call is traced whole: its two queue-length reads before the timing (to size its kept buffers) and,
like-for-like, the options it reads back after the restore to check them are not its cycle's, and are left out of
its counts (`untimed`). Needs root (a network namespace), strace and a C compiler.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from sockrepair.bench import cref, independent
from sockrepair.bench.bench_engine import TAIL_BYTES, _stream
from sockrepair.bench.results import (
    C_OPTIONS_IMPL,
    C_WARM_IMPL,
    SOCKREPAIR_IMPL,
    Syscalls,
)
from sockrepair.errors import BenchmarkError
from sockrepair.netns import NetNS

SIZES = independent.SIZES
MARKS = (999_990, 999_991)  # fd numbers closed as markers: EBADF, visible in the trace, nothing else happens
TIMEOUT = 120.0
PART = "syscalls"  # the .part of this module's BenchmarkErrors
NO_STRACE_NOTE = "strace not found: the system calls per cycle were not counted (apt-get install strace)"

_LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)$")
_SOCKOPT = re.compile(r"^\d+, (\w+), (\w+)")
_MARK = re.compile(r"^close\((\d+)\)")


def _mark(which: int) -> None:
    try:
        os.close(MARKS[which])
    except OSError:
        pass


def child(library: Path, sizes: Sequence[int]) -> None:
    """Runs under strace: per size, an untraced-in-effect warm-up of each side, then one marked cycle of sockrepair
    and one of C, in that order. C's warm-up goes first and sockrepair's is two cycles: glibc serves the first
    image of a size from a mapping of its own and only then raises its mmap threshold, so the second takes the heap
    (brk) and touches fresh pages; and C's first call mallocs its kept buffers, which would take the heap that
    sockrepair's warm-up freed."""
    lib = independent._load(library)
    longest = max(sizes, default=0)
    to_peer, to_sock = _stream(2, longest + (8 << 20)), _stream(3, longest + TAIL_BYTES)
    for q in sizes:
        independent._c_cycle(lib, q, q == 0, to_peer, to_sock)
        for _ in range(2):
            independent._python_cycle(q, to_peer, to_sock)
        independent._python_cycle(q, to_peer, to_sock, _mark)
        independent._c_cycle(lib, q, q == 0, to_peer, to_sock, _mark)


def _calls(lines: Sequence[str]) -> list[str]:
    """Each call of a traced stretch as "name", or "getsockopt LEVEL NAME" / "setsockopt LEVEL NAME"."""
    out = []
    for line in lines:
        found = _LINE.match(line)
        if found is None or found[2] in ("clock_gettime", "clock_nanosleep"):  # vDSO or nothing of the cycle
            continue
        name, args = found[2], found[3]
        opt = _SOCKOPT.match(args) if name in ("getsockopt", "setsockopt") else None
        out.append(f"{name} {opt[1]} {opt[2]}" if opt else name)
    return out


def parse(trace: str, sizes: Sequence[int]) -> list[Syscalls]:
    """The strace output (`strace -f -qq`, one process's threads) of child(): one entry per marked stretch, in the
    order child() makes them (per size: sockrepair, then C)."""
    stretches: list[list[str]] = []
    current: list[str] | None = None
    for line in trace.splitlines():
        found = _LINE.match(line)
        mark = _MARK.match(f"{found[2]}({found[3]}") if found else None
        if mark and int(mark[1]) == MARKS[0]:
            current = []
        elif mark and int(mark[1]) == MARKS[1] and current is not None:
            stretches.append(current)
            current = None
        elif current is not None:
            current.append(line)
    if len(stretches) != 2 * len(sizes):
        raise BenchmarkError(f"the trace holds {len(stretches)} marked cycles, {2 * len(sizes)} expected", part=PART)
    out: list[Syscalls] = []
    for i, q in enumerate(sizes):
        python, c = _calls(stretches[2 * i]), _calls(stretches[2 * i + 1])
        untimed = _untimed_c(c, options=q == 0)
        out.append(_entry(SOCKREPAIR_IMPL, q, python, 0))
        out.append(_entry(C_OPTIONS_IMPL if q == 0 else C_WARM_IMPL, q, c[untimed[0] : len(c) - untimed[1]],
                          sum(untimed)))
    return out


def _untimed_c(calls: Sequence[str], options: bool) -> tuple[int, int]:
    """How many of the C call's first and last calls are outside its timed part: the queue-length ioctls first; the
    options read back last (getsockopt only: the restore's own last call is a setsockopt or a write)."""
    head = 0
    while head < min(2, len(calls)) and calls[head] == "ioctl":
        head += 1
    tail = 0
    while options and tail < len(calls) - head and calls[len(calls) - 1 - tail].startswith("getsockopt"):
        tail += 1
    return head, tail


def _entry(impl: str, q: int, calls: Sequence[str], untimed: int) -> Syscalls:
    by_name = Counter(call.split(" ")[0] for call in calls)
    options = Counter(call for call in calls if " " in call)
    return {"impl": impl, "queue_bytes": q, "total": len(calls), "calls": dict(by_name.most_common()),
            "options": dict(sorted(options.items())), "untimed": untimed}


def run(sizes: Sequence[int] = SIZES, notes: list[str] | None = None) -> list[Syscalls]:
    """The traced cycles in a network namespace of their own; [] and a note when strace or a compiler is missing."""
    strace = shutil.which("strace")
    if strace is None:
        if notes is not None:
            notes.append(NO_STRACE_NOTE)
        return []
    with tempfile.TemporaryDirectory(prefix="sockrepair-syscalls-") as tmp:
        library = cref.build(Path(tmp), notes, shared=True)
        if library is None:
            return []
        trace = Path(tmp) / "trace"
        argv = [strace, "-f", "-qq", "-o", str(trace), sys.executable, "-m", "sockrepair.bench.syscalls",
                "--child", str(library), "--sizes", ",".join(map(str, sizes))]
        with NetNS() as ns:
            try:
                done = subprocess.run(ns.exec_argv(argv), capture_output=True, text=True, timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                raise BenchmarkError(f"the traced cycles did not finish within {TIMEOUT:g} s", part=PART) from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise BenchmarkError(f"the traced cycles failed: {lines[-1] if lines else done.returncode}", part=PART)
        return parse(trace.read_text(), sizes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="queue sizes in bytes (comma list)")
    parser.add_argument("--child", metavar="LIBRARY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",") if v]
    if args.child:
        child(Path(args.child), sizes)
        return 0
    notes: list[str] = []
    entries = run(sizes, notes)
    for note in notes:
        print(note, file=sys.stderr)
    for e in entries:
        calls = ", ".join(f"{name} {n}" for name, n in e["calls"].items())
        print(f"{e['queue_bytes']:>9} B  {e['impl']:<11} {e['total']:>3} calls per cycle: {calls}")
    from sockrepair.bench.report import option_differences

    for ours, c in zip(entries[::2], entries[1::2]):
        extra, missing = option_differences(ours, c)
        print(f"{ours['queue_bytes']:>9} B  option calls sockrepair makes more than {c['impl']}: {extra or 'none'}; "
              f"{c['impl']} more: {missing or 'none'}")
    return 0 if entries else 1


if __name__ == "__main__":
    sys.exit(main())
