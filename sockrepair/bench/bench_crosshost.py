"""Cross-host migration in the lab (sockrepair/lab/hosts.py: hosts peer, A and B in network namespaces on one
bridge): a plain echo program on A holding N connections from a peer on the peer host is moved, with the service
address, to a receiver on B started beforehand. The peer is one of the workloads of sockrepair/bench/bench_gap.py
(independent request/response clients with Poisson arrivals, a stream both ways, or ping-pong rounds). Measured:
the worst the peer sees (worst request latency, longest pause, longest round trip), and the wire gap (last segment
before the freeze to first after the resume, on the peer's interface, over all the moved connections, from
sockrepair/lab/recorder.py).

    python -m sockrepair.bench.bench_crosshost [--quick] [--json OUT]

Entries are gap entries of impl `sockrepair-crosshost` (the keeping lock) or `sockrepair-droplock-crosshost`
(migrate(keep=False)), with `wire_gap_ms`. A run is verified when the client saw
every echoed byte right and checked every connection after the move, and the wire shows no RST, SYN or FIN and
no hole in either direction of any connection (the FINs of the client's
close at the very end are allowed).
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.bench.bench_gap import (
    Peer,
    RunResult,
    describe,
    entry,
    from_figures,
    handing_off,
    migrate_phases,
    move_ended,
    peer_figures,
)
from sockrepair.bench.results import CROSSHOST_IMPL
from sockrepair.bench.units import connections
from sockrepair.errors import ProcessError, SockrepairError
from sockrepair.lab.hosts import SERVICE4, Lab
from sockrepair.lab.recorder import Recorder, wall_clock
from sockrepair.lab.subjects import raise_fd_limit, start_echo, start_receiver, stop
from sockrepair.move.migrate import migrate
from sockrepair.state import ConnTuple

DROPLOCK_IMPL = "sockrepair-droplock-crosshost"
PORT = 7000
ROUND_TIMEOUT = 30.0  # sockrepair moves in milliseconds: a peer still waiting after this is stuck
ROUND_INTERVAL = 0.0005  # ping-pong: keeps the capture small enough to analyse in seconds
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    runs: dict[tuple[str, str], dict[int, int]]  # (workload, impl) -> connections -> runs
    settle_s: float
    after_s: float


QUICK = Plan({("requests", CROSSHOST_IMPL): {1: 1, 10: 1}, ("requests", DROPLOCK_IMPL): {10: 1}}, 0.2, 0.3)
FULL = Plan({("requests", CROSSHOST_IMPL): {1: 5, 100: 3, 1000: 2},
             ("requests", DROPLOCK_IMPL): {1: 3, 100: 3, 1000: 1},
             ("stream", CROSSHOST_IMPL): {1: 3, 100: 2}, ("stream", DROPLOCK_IMPL): {1: 3, 100: 2},
             ("pingpong", CROSSHOST_IMPL): {1: 3, 100: 2}}, 0.3, 0.5)


@dataclass
class CrossRun:
    run: RunResult
    wire_gap_ms: float | None


def _wire(recorder: Recorder, lab: Lab, ports: Sequence[int], frozen_at: float, resumed_at: float) -> tuple[
        float | None, list[str]]:
    """The wire gap of the service, and every wire problem seen. Taken over all the connections together (the
    last segment of any of them before the freeze, the first of any after the resume): one connection alone may
    have been idle for longer than the move, waiting for its turn in the client's rounds."""
    last: list[float] = []
    first: list[float] = []
    problems: list[str] = []
    for port in ports:
        report = recorder.report(ConnTuple(socket.AF_INET, lab.peer.addr4, port, SERVICE4, PORT), frozen_at,
                                 resumed_at, allow_fin=True)  # the client closes after its last check
        problems += report.problems
        if report.wire_gap is not None:
            if report.wire_gap.last_before is not None:
                last.append(report.wire_gap.last_before)
            if report.wire_gap.first_after is not None:
                first.append(report.wire_gap.first_after)
    gap = (min(first) - max(last)) * 1000 if first and last else None
    return gap, problems


def _client_ports(lab: Lab, pid: int) -> list[int]:
    """The peer's local ports, read from the service's side: /proc/PID/net/tcp of the echo program on A."""
    with open(f"/proc/{pid}/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    peer = socket.inet_aton(lab.peer.addr4)[::-1].hex().upper()
    return sorted({int(r[2].split(":")[1], 16) for r in rows if r[2].split(":")[0] == peer and r[3] == "01"})


def run_once(connections: int, plan: Plan, workload: str = "requests", keep: bool = True) -> CrossRun:
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="sockrepair-crosshost-") as tmp:
        work = Path(tmp)
        server = receiver = None
        client: Peer | None = None
        recorder: Recorder | None = None
        try:
            server = start_echo(f"{SERVICE4}:{PORT}", netns=lab.a.name, log=work / "echo.out")
            receiver = start_receiver(work / "receiver.sock", netns=lab.b.name, max_seconds=600.0)
            client = Peer(workload, SERVICE4, PORT, connections, lab.peer.name, ROUND_TIMEOUT, ROUND_INTERVAL)
            ports = _client_ports(lab, server.pid)
            recorder = Recorder(lab.peer.ifname, lab.peer.name).start()
            time.sleep(plan.settle_s)

            seen: list[list[int]] = []
            began, called = time.monotonic(), time.time()
            try:
                report = migrate(server.pid, dest_netns=lab.b.name, network=lambda: lab.move_service("a", "b"),
                                 handoff=handing_off(work / "receiver.sock", seen), keep=keep)
                moved = RunResult(None, None, report.downtime_ms, migrate_phases(report),
                                  kept=(report.kept.delivered, report.kept.fell_back) if keep else None,
                                  unacked=seen[0] if seen else None, frozen_at=report.frozen_at)
                # the wire's frames carry wall-clock stamps
                frozen_at = wall_clock(report.frozen_at)
                resumed_at = frozen_at + report.downtime_ms / 1000
            except (SockrepairError, OSError) as exc:
                moved = RunResult(None, f"{type(exc).__name__}: {exc}")
                frozen_at, resumed_at = called, time.time()
            time.sleep(plan.after_s)
            talk = client.stop()
            client = None
            recorder.stop()
            wire_gap, problems = _wire(recorder, lab, ports, frozen_at, resumed_at)
        except ProcessError as exc:
            return CrossRun(RunResult(None, str(exc)), None)
        finally:
            if recorder is not None:
                recorder.stop()
            if client is not None:
                client.close()
            stop(receiver)
            stop(server)
    figures = peer_figures(talk, began, move_ended(moved, began), moved.unacked)
    errors = ([moved.error] if moved.error else []) + list(talk.get("errors", [])) + problems
    if not talk.get("swept") and not errors:
        errors.append("the client did not check every connection after the move")
    return CrossRun(from_figures(moved, figures, errors), wire_gap)


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """{"gap": [Gap of impl sockrepair-crosshost or sockrepair-droplock-crosshost], "notes": [str]}."""
    say = progress or (lambda _text: None)
    plan = QUICK if quick else FULL
    raise_fd_limit()
    results: dict[tuple[str, str, int], list[CrossRun]] = {}
    cases = [(w, impl, n) for (w, impl), counts in plan.runs.items() for n in sorted(counts)]
    rounds = max(max(counts.values()) for counts in plan.runs.values())
    schedule = [(w, impl, n) for k in range(rounds) for w, impl, n in cases if k < plan.runs[(w, impl)][n]]
    for i, (workload, impl, n) in enumerate(schedule, 1):
        say(f"cross-host {i}/{len(schedule)}: {workload}, {impl}, {connections(n)} "
            "from A to B")
        outcome = run_once(n, plan, workload, keep=impl == CROSSHOST_IMPL)
        results.setdefault((workload, impl, n), []).append(outcome)
        wire = "—" if outcome.wire_gap_ms is None else f"{outcome.wire_gap_ms:.2f} ms"
        say(f"    {describe(workload, outcome.run)}, wire gap {wire}")
    entries = []
    for (workload, impl, n), runs in results.items():
        e = entry(impl, n, [r.run for r in runs], workload)
        e["wire_gap_ms"] = _median([r.wire_gap_ms for r in runs if r.run.error is None and r.wire_gap_ms is not None])
        entries.append(e)
    return {"gap": entries, "notes": []}


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 connections, one run each")
    parser.add_argument("--json", metavar="OUT", help="also write the entries here")
    args = parser.parse_args()
    out = run(args.quick, lambda text: print(text, file=sys.stderr, flush=True))
    for e in out["gap"]:
        state = "" if e["verified"] else f"  NOT VERIFIED: {e.get('error')}"
        wire = e.get("wire_gap_ms", math.nan)
        slow = f", {e['over_200ms']} of {e['requests']} requests >= 200 ms" if "over_200ms" in e else ""
        print(f"{e.get('workload', 'pingpong'):<9}{e['connections']:>6} {e['impl']:<30} peer gap {e['gap_ms']:.2f} ms"
              f"{slow}, wire gap {wire:.2f} ms{state}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(e["verified"] for e in out["gap"]) else 1


if __name__ == "__main__":
    sys.exit(main())
