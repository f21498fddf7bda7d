"""Cross-host migration in the lab (sockrepair/lab/hosts.py: hosts peer, A and B in network namespaces on one
bridge): a plain echo program on A holding N connections from a peer on the peer host is moved, with the service
address, to a receiver on B started beforehand. The peer is one of the workloads of sockrepair/bench/bench_gap.py
(independent request/response clients with Poisson arrivals, a stream both ways, or ping-pong rounds). Measured:
the worst the peer sees (worst request latency, longest pause, longest round trip), and the wire gap (last segment
before the freeze to first after the resume, on the peer's interface, over all the moved connections, from
sockrepair/lab/recorder.py).

    python -m sockrepair.bench.bench_crosshost [--quick] [--json OUT]

Entries are gap entries of impl `sockrepair-crosshost` (the keeping lock), `sockrepair-droplock-crosshost`
(migrate(keep=False)), `criu-nftables-crosshost` or `criu-iptables-crosshost` (criu dump on A and criu restore on
B, each with that network lock), with `wire_gap_ms`. criu's restore takes no lock on B (its lock is the dump's, on
A), and once the service address is on B the peers' packets reach B, which resets them while their sockets do not
exist yet (1 run of 1 at 100 connections): the run holds them on B (HOLD_RULESET: dropped, as an operator would)
from before the address moves until criu's restore is about to resume the tree (its action script at pre-resume
lifts the hold, with the nft command: some 20 ms counted in criu's restore). A run is verified when the client saw
every echoed byte right and checked every connection after the move, and the wire shows no RST, SYN or FIN and
no hole in either direction of any connection (the FINs of the client's
close at the very end are allowed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.bench.bench_gap import (
    CRIU_LOCKS,
    CRIU_TIMEOUT,
    Peer,
    RunResult,
    criu_dump,
    criu_restore,
    describe,
    entry,
    from_figures,
    handing_off,
    kill_pid,
    migrate_phases,
    move_ended,
    peer_figures,
)
from sockrepair.bench.bench_gap import (
    ROUND_TIMEOUT as CRIU_ROUND_TIMEOUT,
)
from sockrepair.bench.results import CROSSHOST_IMPL
from sockrepair.bench.units import connections
from sockrepair.criu.locate import Criu, find_criu
from sockrepair.errors import CriuError, ProcessError, SockrepairError
from sockrepair.lab.hosts import SERVICE4, Lab
from sockrepair.lab.recorder import Recorder, wall_clock
from sockrepair.lab.subjects import raise_fd_limit, start_echo, start_receiver, stop
from sockrepair.move.migrate import migrate
from sockrepair.state import ConnTuple

DROPLOCK_IMPL = "sockrepair-droplock-crosshost"
CRIU_IMPLS = tuple(f"criu-{lock}-crosshost" for lock in CRIU_LOCKS)
SOCKREPAIR_IMPLS = (CROSSHOST_IMPL, DROPLOCK_IMPL)
PORT = 7000
ROUND_TIMEOUT = 30.0  # sockrepair moves in milliseconds: a peer still waiting after this is stuck
ROUND_INTERVAL = 0.0005  # ping-pong: keeps the capture small enough to analyse in seconds
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    runs: dict[tuple[str, str], dict[int, int]]  # (workload, impl) -> connections -> runs
    settle_s: float
    after_s: float


QUICK = Plan({("requests", CROSSHOST_IMPL): {1: 1, 10: 1}, ("requests", DROPLOCK_IMPL): {10: 1},
              ("requests", "criu-nftables-crosshost"): {10: 1}}, 0.2, 0.3)
FULL = Plan({("requests", CROSSHOST_IMPL): {1: 5, 100: 3, 1000: 2},
             ("requests", DROPLOCK_IMPL): {1: 3, 100: 3, 1000: 1},
             ("requests", "criu-nftables-crosshost"): {1: 3, 100: 2, 1000: 1},
             ("requests", "criu-iptables-crosshost"): {1: 3, 100: 1, 1000: 1},
             ("stream", CROSSHOST_IMPL): {1: 3, 100: 2, 1000: 2}, ("stream", DROPLOCK_IMPL): {1: 3, 100: 2, 1000: 1},
             ("stream", "criu-nftables-crosshost"): {1: 2, 100: 1, 1000: 1},
             ("stream", "criu-iptables-crosshost"): {1: 2, 100: 1, 1000: 1},
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


def _move_sockrepair(lab: Lab, pid: int, receiver: Path, keep: bool) -> tuple[RunResult, float, float]:
    """migrate() from A to B with the service address; the result, and the wall-clock times of the freeze and the
    resume (the wire's frames carry wall-clock stamps)."""
    seen: list[list[int]] = []
    called = time.time()
    try:
        report = migrate(pid, dest_netns=lab.b.name, network=lambda: lab.move_service("a", "b"),
                         handoff=handing_off(receiver, seen), keep=keep)
    except (SockrepairError, OSError) as exc:
        return RunResult(None, f"{type(exc).__name__}: {exc}"), called, time.time()
    moved = RunResult(None, None, report.downtime_ms, migrate_phases(report),
                      kept=(report.kept.delivered, report.kept.fell_back) if keep else None,
                      unacked=seen[0] if seen else None, frozen_at=report.frozen_at)
    frozen_at = wall_clock(report.frozen_at)
    return moved, frozen_at, frozen_at + report.downtime_ms / 1000


# B's hold for criu: what the peers send to the service once its address is on B is dropped (never reset) until
# criu's restore resumes the tree. criu restores into a namespace without locking it (its lock is the dump's, on A),
# and B would reset every packet that arrived before the sockets existed. Only the peers' side is held: the
# restored program's answers must pass once it runs.
HOLD_TABLE = "sockrepair-bench-hold"
HOLD_RULESET = f"""table inet {HOLD_TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority -300;
        meta mark 0xc114 accept
        ip daddr {SERVICE4} tcp dport {PORT} drop
    }}
}}
"""
# criu runs it at each stage of the restore (CRTOOLS_SCRIPT_ACTION): the hold goes right before the tree resumes,
# as criu's own unlock does on one host
HOLD_RELEASE = f"""#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = pre-resume ] || exit 0
exec {{nft}} delete table inet {HOLD_TABLE}
"""


def _move_criu(criu: Criu, lab: Lab, server: subprocess.Popen[bytes], lock: str, work: Path) -> tuple[
        RunResult, float, float]:
    """criu dump on A, B held, the service address moved, criu restore on B (which lifts the hold before it
    resumes the tree); the result (downtime: all of it), and the wall-clock times of the dump's start and the
    restore's end."""
    images = work / "images"
    images.mkdir()
    nft = shutil.which("nft")
    if nft is None:
        return RunResult(None, "nft is not installed: B cannot be held for criu"), time.time(), time.time()
    hold, release = work / "hold.nft", work / "release-hold.sh"
    hold.write_text(HOLD_RULESET)
    release.write_text(HOLD_RELEASE.format(nft=nft))
    release.chmod(0o700)
    called, start = time.time(), time.monotonic()
    with lab.a.entered():
        failed = criu_dump(criu, images, server.pid, lock, CRIU_TIMEOUT)
    dumped = time.monotonic()
    if failed:
        return RunResult(None, failed), called, time.time()
    server.wait(30)  # the dumped root is our child: a zombie would hold its pid, and restore would fail
    with lab.b.entered():
        subprocess.run([nft, "-f", str(hold)], check=True, capture_output=True, timeout=30)
        try:
            lab.move_service("a", "b")
            moved = time.monotonic()
            failed = criu_restore(criu, images, lock, CRIU_TIMEOUT, "--action-script", str(release))
        finally:  # a restore that failed before it resumed left the hold
            left = subprocess.run([nft, "delete", "table", "inet", HOLD_TABLE], capture_output=True,
                                  timeout=30).returncode == 0
    restored, resumed_at = time.monotonic(), time.time()
    if failed:
        return RunResult(None, failed), called, resumed_at
    if left:  # criu ignores what its scripts return: the peers were held until it returned, a run not like the rest
        return RunResult(None, "criu's pre-resume action did not lift the hold on B"), called, resumed_at
    return RunResult(None, None, (restored - start) * 1000, {"criu dump": (dumped - start) * 1000,
                     "network": (moved - dumped) * 1000, "criu restore": (restored - moved) * 1000}), called, resumed_at


def run_once(connections: int, plan: Plan, workload: str = "requests", impl: str = CROSSHOST_IMPL,
             criu: Criu | None = None) -> CrossRun:
    """One move of `connections` connections from A to B with `impl` (CRIU_IMPLS need `criu`) under `workload`."""
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="sockrepair-crosshost-") as tmp:
        work = Path(tmp)
        server = receiver = None
        client: Peer | None = None
        recorder: Recorder | None = None
        try:
            server = start_echo(f"{SERVICE4}:{PORT}", netns=lab.a.name, log=work / "echo.out")
            if impl in SOCKREPAIR_IMPLS:
                receiver = start_receiver(work / "receiver.sock", netns=lab.b.name, max_seconds=600.0)
            timeout = ROUND_TIMEOUT if impl in SOCKREPAIR_IMPLS else CRIU_ROUND_TIMEOUT
            client = Peer(workload, SERVICE4, PORT, connections, lab.peer.name, timeout, ROUND_INTERVAL)
            ports = _client_ports(lab, server.pid)
            recorder = Recorder(lab.peer.ifname, lab.peer.name).start()
            time.sleep(plan.settle_s)
            began = time.monotonic()
            if impl in SOCKREPAIR_IMPLS:
                moved, frozen_at, resumed_at = _move_sockrepair(lab, server.pid, work / "receiver.sock",
                                                                keep=impl == CROSSHOST_IMPL)
            else:
                assert criu is not None
                moved, frozen_at, resumed_at = _move_criu(criu, lab, server, impl.split("-")[1], work)
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
            if server is not None:
                pid = server.pid
                stop(server)
                if impl not in SOCKREPAIR_IMPLS:
                    kill_pid(pid)  # the tree criu restored on B, under the same pid
    figures = peer_figures(talk, began, move_ended(moved, began), moved.unacked)
    errors = ([moved.error] if moved.error else []) + list(talk.get("errors", [])) + problems
    if not talk.get("swept") and not errors:
        errors.append("the client did not check every connection after the move")
    return CrossRun(from_figures(moved, figures, errors), wire_gap)


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """{"gap": [Gap of an impl of SOCKREPAIR_IMPLS or CRIU_IMPLS], "notes": [str]}; the criu impls are left out with
    a note when criu is not usable here."""
    say = progress or (lambda _text: None)
    plan = QUICK if quick else FULL
    notes: list[str] = []
    criu: Criu | None = None
    runs = dict(plan.runs)
    if any(impl in CRIU_IMPLS for _, impl in runs):
        try:
            criu = find_criu().require_working()
        except CriuError as exc:
            notes.append(f"criu variants of the cross-host benchmark skipped: {exc}")
            runs = {key: counts for key, counts in runs.items() if key[1] not in CRIU_IMPLS}
    raise_fd_limit()
    results: dict[tuple[str, str, int], list[CrossRun]] = {}
    cases = [(w, impl, n) for (w, impl), counts in runs.items() for n in sorted(counts)]
    rounds = max(max(counts.values()) for counts in runs.values())
    schedule = [(w, impl, n) for k in range(rounds) for w, impl, n in cases if k < runs[(w, impl)][n]]
    for i, (workload, impl, n) in enumerate(schedule, 1):
        say(f"cross-host {i}/{len(schedule)}: {workload}, {impl}, {connections(n)} "
            "from A to B")
        outcome = run_once(n, plan, workload, impl, criu)
        results.setdefault((workload, impl, n), []).append(outcome)
        wire = "—" if outcome.wire_gap_ms is None else f"{outcome.wire_gap_ms:.2f} ms"
        say(f"    {describe(workload, outcome.run)}, wire gap {wire}")
    entries = []
    for (workload, impl, n), outcomes in results.items():
        e = entry(impl, n, [r.run for r in outcomes], workload)
        e["wire_gap_ms"] = _median([r.wire_gap_ms for r in outcomes
                                    if r.run.error is None and r.wire_gap_ms is not None])
        entries.append(e)
    return {"gap": entries, "notes": notes}


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
