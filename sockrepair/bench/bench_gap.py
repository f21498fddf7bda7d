"""Peer-seen gap: a plain echo program holding N live connections is moved while a ping-pong client (another
process) logs every round trip; the gap is the longest round trip that ended after the move began.

    python -m sockrepair.bench.bench_gap [--quick] [--json OUT]

Variants, interleaved run by run, each run in a network namespace of its own:
- `sockrepair`: sockrepair.migrate() freezes the program, locks and checkpoints its connections, kills it, restores
  them and passes them over a UNIX socket to a receiver that was started beforehand
  (sockrepair/lab/programs/receiver.py);
- `criu-nftables`, `criu-iptables`: `criu dump -t PID --tcp-established --network-lock M` of the program's tree,
  then `criu restore --tcp-established -d` of the same tree, which carries on echoing.
A run is verified when the client saw every echoed byte right and, after the move, one more round on every
connection succeeded.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockrepair.bench.results import SOCKREPAIR_IMPL, Gap, gap_from_runs
from sockrepair.criu.locate import Criu, find_criu
from sockrepair.errors import CriuError, ProcessError, SockrepairError
from sockrepair.lab.subjects import (
    PingPongClient,
    largest_gap_s,
    raise_fd_limit,
    start_echo,
    start_receiver,
    stop,
)
from sockrepair.move.handoff import send_over_unix
from sockrepair.move.migrate import MigrationReport, migrate
from sockrepair.netns import NetNS

Progress = Callable[[str], None]
ADDR = "127.0.0.1"
CRIU_LOCKS = ("nftables", "iptables")
VARIANTS = (SOCKREPAIR_IMPL, *(f"criu-{lock}" for lock in CRIU_LOCKS))
CRIU_TIMEOUT = 900.0  # criu with its iptables lock takes minutes for 1,000 connections
ROUND_TIMEOUT = 900.0  # a round caught by criu's lock waits for the client's backed-off retransmission


@dataclass(frozen=True)
class Plan:
    runs: dict[str, dict[int, int]]  # variant -> connections -> runs
    settle_s: float  # rounds before the move
    after_s: float  # rounds after it, before the client is told to stop


QUICK = Plan({v: {1: 1} for v in VARIANTS} | {SOCKREPAIR_IMPL: {1: 2}}, settle_s=0.2, after_s=0.2)
FULL = Plan({SOCKREPAIR_IMPL: {1: 9, 100: 5, 1000: 5},
             "criu-nftables": {1: 3, 100: 3, 1000: 1},
             "criu-iptables": {1: 3, 100: 2, 1000: 1}}, settle_s=0.3, after_s=0.3)


@dataclass
class RunResult:
    gap_ms: float | None
    error: str | None
    downtime_ms: float | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)


def _free_port(ns: NetNS) -> int:
    with ns.entered(), socket.socket() as s:
        s.bind((ADDR, 0))
        return int(s.getsockname()[1])


def _criu_error(log: Path, done_stderr: str) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [line.strip() for line in lines + done_stderr.splitlines() if "Error" in line]
    return errors[0] if errors else (done_stderr.strip().splitlines() or ["no error in the log"])[-1]


def _kill_pid(pid: int) -> None:
    """A tree criu restored is no longer our child: kill it by pid (the namespace's deletion would, too)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def move_with_criu(criu: Criu, ns: NetNS, pid: int, reap: Callable[[], None], lock: str, work: Path) -> RunResult:
    images = work / "images"
    images.mkdir()
    start = time.monotonic()
    with ns.entered():
        done = criu.run(["dump", "-t", str(pid), "-D", str(images), "--tcp-established", "--network-lock", lock,
                         "-o", "dump.log"], timeout=CRIU_TIMEOUT)
    dumped = time.monotonic()
    if done.returncode != 0:
        return RunResult(None, f"criu dump failed: {_criu_error(images / 'dump.log', done.stderr)}")
    reap()  # the dumped root is our child: a zombie would hold its pid, and restore would fail
    with ns.entered():
        done = criu.run(["restore", "-D", str(images), "--tcp-established", "--network-lock", lock, "-d",
                         "-o", "restore.log"], timeout=CRIU_TIMEOUT)
    restored = time.monotonic()
    if done.returncode != 0:
        return RunResult(None, f"criu restore failed: {_criu_error(images / 'restore.log', done.stderr)}")
    return RunResult(None, None, (restored - start) * 1000,
                     {"criu dump": (dumped - start) * 1000, "criu restore": (restored - dumped) * 1000})


def move_with_sockrepair(ns: NetNS, pid: int, unix_path: Path, profiler: cProfile.Profile | None = None) -> RunResult:
    def handoff(socks: list[socket.socket], tuples: list[Any]) -> None:
        send_over_unix(str(unix_path), socks, tuples)
        for s in socks:
            s.close()

    with ns.entered():
        if profiler is not None:
            profiler.enable()
        try:
            report = migrate(pid, dest_netns=ns.name, handoff=handoff)
        finally:
            if profiler is not None:
                profiler.disable()
    return RunResult(None, None, report.downtime_ms, migrate_phases(report))


def migrate_phases(report: MigrationReport) -> dict[str, float]:
    """The report's phases, plus `untimed`: the part of the downtime (freeze to unlock) that falls in none of them
    (finding the sockets in /proc, taking them with pidfd_getfd, closing the copies)."""
    phases = dict(report.phases_ms)
    inside = sum(ms for name, ms in phases.items() if name != "handoff")
    phases["untimed"] = max(0.0, report.downtime_ms - inside)
    return phases


def run_once(variant: str, connections: int, plan: Plan, criu: Criu | None,
             profiler: cProfile.Profile | None = None) -> RunResult:
    """One move of `connections` connections with `variant`, in a namespace made for it and deleted after;
    sockrepair's migrate() runs under `profiler` when one is given."""
    with NetNS() as ns, tempfile.TemporaryDirectory(prefix="sockrepair-gap-") as tmp:
        work = Path(tmp)
        port = _free_port(ns)
        server = receiver = None
        client: PingPongClient | None = None
        moved: RunResult | None = None
        try:
            server = start_echo(f"{ADDR}:{port}", netns=ns.name, log=work / "echo.out")
            if variant == SOCKREPAIR_IMPL:
                receiver = start_receiver(work / "receiver.sock", netns=ns.name, max_seconds=CRIU_TIMEOUT)
            client = PingPongClient(ADDR, port, connections, netns=ns.name, round_timeout=ROUND_TIMEOUT,
                                    max_seconds=2 * CRIU_TIMEOUT)
            time.sleep(plan.settle_s)
            began = time.monotonic()
            try:
                if variant == SOCKREPAIR_IMPL:
                    moved = move_with_sockrepair(ns, server.pid, work / "receiver.sock", profiler)
                else:
                    assert criu is not None
                    srv = server
                    moved = move_with_criu(criu, ns, server.pid, lambda: srv.wait(30), variant.split("-", 1)[1], work)
            except (SockrepairError, OSError) as exc:
                moved = RunResult(None, f"{type(exc).__name__}: {exc}")
            time.sleep(plan.after_s)
            report = client.stop(sweep_timeout=ROUND_TIMEOUT)
            client = None
        except ProcessError as exc:
            return RunResult(None, str(exc))
        finally:
            if client is not None:
                client.close()
            stop(receiver)
            if server is not None:
                pid = server.pid
                stop(server)
                if variant != SOCKREPAIR_IMPL:
                    _kill_pid(pid)
    gap = largest_gap_s(report, began)
    errors = ([moved.error] if moved.error else []) + list(report.get("errors", []))
    if not report.get("swept") and not errors:
        errors.append("the client did not check every connection after the move")
    return RunResult(None if gap is None else gap * 1000, "; ".join(errors) or None, moved.downtime_ms,
                     moved.phases_ms)


def _schedule(plan: Plan, variants: Sequence[str], counts: Sequence[int] | None) -> list[tuple[str, int]]:
    """Runs interleaved: round k holds the k-th run of every (variant, connections) that has one."""
    cases = [(v, n) for n in sorted({n for v in variants for n in plan.runs.get(v, {})}) for v in variants
             if n in plan.runs.get(v, {}) and (counts is None or n in counts)]
    rounds = max((plan.runs[v][n] for v, n in cases), default=0)
    return [(v, n) for k in range(rounds) for v, n in cases if k < plan.runs[v][n]]


def run(quick: bool = False, progress: Progress | None = None, variants: Sequence[str] = VARIANTS,
        counts: Sequence[int] | None = None) -> dict[str, Any]:
    """{"gap": [Gap], "notes": [str]}; criu variants are left out with a note when criu is not usable here."""
    say = progress or (lambda _text: None)
    plan = QUICK if quick else FULL
    notes: list[str] = []
    criu: Criu | None = None
    if any(v != SOCKREPAIR_IMPL for v in variants):
        try:
            criu = find_criu().require_working()
        except CriuError as exc:
            notes.append(f"criu variants of the peer-gap benchmark skipped: {exc}")
            variants = [v for v in variants if v == SOCKREPAIR_IMPL]
    raise_fd_limit()
    results: dict[tuple[str, int], list[RunResult]] = {}
    schedule = _schedule(plan, variants, counts)
    for i, (variant, n) in enumerate(schedule, 1):
        say(f"gap {i}/{len(schedule)}: {variant}, {n:,} connection{'s' if n > 1 else ''}")
        outcome = run_once(variant, n, plan, criu)
        results.setdefault((variant, n), []).append(outcome)
        gap = "—" if outcome.gap_ms is None else f"{outcome.gap_ms:.2f} ms"
        say(f"    largest gap {gap}" + (f"; FAILED: {outcome.error}" if outcome.error else ""))
    return {"gap": [entry(variant, n, runs) for (variant, n), runs in results.items()], "notes": notes}


def entry(impl: str, connections: int, runs: Sequence[RunResult]) -> Gap:
    good = [r for r in runs if r.error is None and r.gap_ms is not None]
    failed = next((r.error for r in runs if r.error is not None), None)
    return gap_from_runs(impl, connections, [r.gap_ms for r in good if r.gap_ms is not None], failed is None,
                         failed, [r.downtime_ms for r in good if r.downtime_ms is not None],
                         [r.phases_ms for r in good])


def _print(gaps: Sequence[Gap]) -> None:
    for g in sorted(gaps, key=lambda g: (g["connections"], g["impl"])):
        state = "" if g["verified"] else f"  NOT VERIFIED: {g.get('error')}"
        gap = "—" if math.isnan(g["gap_ms"]) else f"{g['gap_ms']:10.2f} ms"
        print(f"{g['connections']:>6} {g['impl']:<16} gap {gap} over {g['runs']} runs{state}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one connection, one or two runs per variant")
    parser.add_argument("--json", metavar="OUT", help="also write the entries here")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--counts", default="", help="connection counts to run (comma list; default: the plan's)")
    args = parser.parse_args()
    counts = [int(v) for v in args.counts.split(",") if v] or None
    out = run(args.quick, lambda text: print(text, file=sys.stderr, flush=True), args.variants.split(","), counts)
    for note in out["notes"]:
        print(note, file=sys.stderr)
    _print(out["gap"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(g["verified"] for g in out["gap"]) else 1


if __name__ == "__main__":
    sys.exit(main())
