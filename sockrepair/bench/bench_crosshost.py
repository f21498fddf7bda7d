"""Cross-host migration in the lab (sockrepair/lab/hosts.py: hosts peer, A and B in network namespaces on one
bridge): a plain echo program on A holding N connections from a ping-pong client on the peer is moved, with the
service address, to a receiver on B. Measured: the gap the client sees, and the wire gap (last segment before the
freeze to first after the resume, on the peer's interface, over all the moved connections, from
sockrepair/lab/recorder.py).

    python -m sockrepair.bench.bench_crosshost [--quick] [--json OUT]

Entries are gap entries of impl `sockrepair-crosshost` with `wire_gap_ms`. A run is verified when the client saw
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

from sockrepair.bench.bench_gap import RunResult, entry, migrate_phases
from sockrepair.errors import ProcessError, SockrepairError
from sockrepair.lab.hosts import SERVICE4, Lab
from sockrepair.lab.recorder import Recorder
from sockrepair.lab.subjects import (
    PingPongClient,
    largest_gap_s,
    raise_fd_limit,
    start_echo,
    start_receiver,
    stop,
)
from sockrepair.move.handoff import send_over_unix
from sockrepair.move.migrate import migrate
from sockrepair.state import ConnTuple

IMPL = "sockrepair-crosshost"
PORT = 7000
ROUND_INTERVAL = 0.0005  # keeps the capture small enough to analyse in seconds
ROUND_TIMEOUT = 60.0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    runs: dict[int, int]  # connections -> runs
    settle_s: float
    after_s: float


QUICK = Plan({1: 1}, 0.2, 0.3)
FULL = Plan({1: 5, 100: 3}, 0.3, 0.5)


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


def run_once(connections: int, plan: Plan) -> CrossRun:
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="sockrepair-crosshost-") as tmp:
        work = Path(tmp)
        server = receiver = None
        client: PingPongClient | None = None
        recorder: Recorder | None = None
        try:
            server = start_echo(f"{SERVICE4}:{PORT}", netns=lab.a.name, log=work / "echo.out")
            receiver = start_receiver(work / "receiver.sock", netns=lab.b.name, max_seconds=600.0)
            client = PingPongClient(SERVICE4, PORT, connections, netns=lab.peer.name, interval=ROUND_INTERVAL,
                                    round_timeout=ROUND_TIMEOUT, max_seconds=600.0)
            ports = _client_ports(lab, server.pid)
            recorder = Recorder(lab.peer.ifname, lab.peer.name).start()
            time.sleep(plan.settle_s)

            def handoff(socks: list[socket.socket], tuples: list[ConnTuple]) -> None:
                send_over_unix(str(work / "receiver.sock"), socks, tuples)
                for s in socks:
                    s.close()

            began, frozen_at = time.monotonic(), time.time()
            try:
                report = migrate(server.pid, dest_netns=lab.b.name, network=lambda: lab.move_service("a", "b"),
                                 handoff=handoff)
                moved = RunResult(None, None, report.downtime_ms, migrate_phases(report))
                resumed_at = frozen_at + report.downtime_ms / 1000
            except (SockrepairError, OSError) as exc:
                moved, resumed_at = RunResult(None, f"{type(exc).__name__}: {exc}"), time.time()
            time.sleep(plan.after_s)
            talk = client.stop(sweep_timeout=ROUND_TIMEOUT)
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
    gap = largest_gap_s(talk, began)
    errors = ([moved.error] if moved.error else []) + list(talk.get("errors", [])) + problems
    if not talk.get("swept") and not errors:
        errors.append("the client did not check every connection after the move")
    return CrossRun(RunResult(None if gap is None else gap * 1000, "; ".join(errors) or None, moved.downtime_ms,
                              moved.phases_ms), wire_gap)


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """{"gap": [Gap of impl sockrepair-crosshost], "notes": [str]}."""
    say = progress or (lambda _text: None)
    plan = QUICK if quick else FULL
    raise_fd_limit()
    results: dict[int, list[CrossRun]] = {}
    schedule = [n for k in range(max(plan.runs.values())) for n in sorted(plan.runs) if k < plan.runs[n]]
    for i, n in enumerate(schedule, 1):
        say(f"cross-host {i}/{len(schedule)}: {n:,} connection{'s' if n > 1 else ''} from A to B")
        outcome = run_once(n, plan)
        results.setdefault(n, []).append(outcome)
        gap = "—" if outcome.run.gap_ms is None else f"{outcome.run.gap_ms:.2f} ms"
        wire = "—" if outcome.wire_gap_ms is None else f"{outcome.wire_gap_ms:.2f} ms"
        say(f"    peer gap {gap}, wire gap {wire}" + (f"; FAILED: {outcome.run.error}" if outcome.run.error else ""))
    entries = []
    for n, runs in results.items():
        e = entry(IMPL, n, [r.run for r in runs])
        e["wire_gap_ms"] = _median([r.wire_gap_ms for r in runs if r.run.error is None and r.wire_gap_ms is not None])
        entries.append(e)
    return {"gap": entries, "notes": []}


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one connection, one run")
    parser.add_argument("--json", metavar="OUT", help="also write the entries here")
    args = parser.parse_args()
    out = run(args.quick, lambda text: print(text, file=sys.stderr, flush=True))
    for e in out["gap"]:
        state = "" if e["verified"] else f"  NOT VERIFIED: {e.get('error')}"
        wire = e.get("wire_gap_ms", math.nan)
        print(f"{e['connections']:>6} peer gap {e['gap_ms']:.2f} ms, wire gap {wire:.2f} ms{state}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(e["verified"] for e in out["gap"]) else 1


if __name__ == "__main__":
    sys.exit(main())
