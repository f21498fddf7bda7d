"""Peer-seen gap: a plain echo program holding N live connections is moved while a peer (another process) times
what it sees; the gap is the worst it saw after the move began.

    python -m sockrepair.bench.bench_gap [--quick] [--json OUT] [--workloads requests,stream,pingpong]

Workloads (the peer, sockrepair/lab/programs/):
- `requests`: N independent request/response clients, 64-byte requests at Poisson arrivals (mean 20 ms per
  connection, longer past 100 connections so that the whole stays at 5,000 requests/s), every request's latency
  recorded from the moment it was due: the gap is the worst request answered after the move began, and the entry
  counts the requests that waited 200 ms or more (a retransmission timeout);
- `stream`: N connections streaming in both directions (1 KiB every 2 ms per connection, longer past 10
  connections): the gap is the longest pause in what the peer receives;
- `pingpong`: N connections doing back-to-back checked rounds, one connection after the other: the gap is the
  longest round trip.
Variants, interleaved run by run, each run in a network namespace of its own:
- `sockrepair`: sockrepair.migrate() freezes the program, locks and checkpoints its connections (the lock keeps what
  the peers send and delivers it to the restored sockets), kills it, restores them and passes them over a UNIX
  socket to a receiver that was started beforehand (sockrepair/lab/programs/receiver.py);
- `sockrepair-droplock`: the same with migrate(keep=False), the lock that drops what the peers send;
- `criu-nftables`, `criu-iptables`: `criu dump -t PID --tcp-established --network-lock M` of the program's tree,
  then `criu restore --tcp-established -d` of the same tree, which carries on echoing.
A run is verified when the peer saw every echoed byte right and, after the move, one more request on every
connection succeeded.
"""

from __future__ import annotations

import argparse
import cProfile
import fcntl
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockrepair.bench.results import SOCKREPAIR_IMPL, Gap, gap_from_runs
from sockrepair.bench.units import connections
from sockrepair.criu.locate import Criu, find_criu
from sockrepair.errors import BenchmarkError, CriuError, ProcessError, SockrepairError
from sockrepair.lab.subjects import (
    PingPongClient,
    RequestClient,
    largest_gap_s,
    raise_fd_limit,
    start_echo,
    start_receiver,
    stop,
    worst_after,
)
from sockrepair.move.handoff import send_over_unix
from sockrepair.move.migrate import MigrationReport, migrate
from sockrepair.netns import NetNS

Progress = Callable[[str], None]
ADDR = "127.0.0.1"
CRIU_LOCKS = ("nftables", "iptables")
DROPLOCK_IMPL = "sockrepair-droplock"
SOCKREPAIR_IMPLS = (SOCKREPAIR_IMPL, DROPLOCK_IMPL)
VARIANTS = (*SOCKREPAIR_IMPLS, *(f"criu-{lock}" for lock in CRIU_LOCKS))
WORKLOADS = ("requests", "stream", "pingpong")
CRIU_TIMEOUT = 900.0  # criu with its iptables lock takes minutes for 1,000 connections
ROUND_TIMEOUT = 900.0  # a round caught by criu's lock waits for the client's backed-off retransmission
SOCKREPAIR_TIMEOUT = 30.0  # sockrepair moves in milliseconds: a peer still waiting after this is stuck
QUICK_TIMEOUT = 60.0  # every wait of a quick run (a handful of connections)
REQUEST_BYTES = 64
REQUEST_INTERVAL_S = 0.02  # mean time between a connection's requests
REQUESTS_PER_S = 5000.0  # at most, over all connections: the interval grows past 100 connections
STREAM_BYTES = 1024
STREAM_INTERVAL_S = 0.002
STREAM_WRITES_PER_S = 5000.0
RTO_S = 0.2  # the shortest retransmission timeout: a request this slow waited for one


@dataclass(frozen=True)
class Plan:
    runs: dict[str, dict[str, dict[int, int]]]  # workload -> variant -> connections -> runs
    settle_s: float  # traffic before the move
    after_s: float  # traffic after it, before the peer is told to stop
    timeout_s: float | None = None  # every wait of a run; None: by variant (criu's can take minutes)


def _all(runs: dict[int, int]) -> dict[str, dict[int, int]]:
    return {v: dict(runs) for v in VARIANTS}


QUICK = Plan({"requests": _all({1: 1, 10: 1}),
              "stream": {v: {1: 1} for v in SOCKREPAIR_IMPLS}},
             settle_s=0.2, after_s=0.3, timeout_s=QUICK_TIMEOUT)
FULL = Plan({"requests": {SOCKREPAIR_IMPL: {1: 9, 100: 5, 1000: 5}, DROPLOCK_IMPL: {1: 5, 100: 3, 1000: 3},
                          "criu-nftables": {1: 3, 100: 3, 1000: 1}, "criu-iptables": {1: 3, 100: 2, 1000: 1}},
             "stream": {SOCKREPAIR_IMPL: {1: 5, 100: 3, 1000: 2}, DROPLOCK_IMPL: {1: 5, 100: 3, 1000: 1},
                        "criu-nftables": {1: 2, 100: 1, 1000: 1}, "criu-iptables": {1: 2, 100: 1, 1000: 1}},
             "pingpong": {SOCKREPAIR_IMPL: {1: 5, 100: 3, 1000: 3}, "criu-nftables": {1: 2, 100: 1},
                          "criu-iptables": {1: 2, 100: 1}}},
            settle_s=0.5, after_s=0.5)


def request_interval(connections: int) -> float:
    """Mean seconds between the requests of one connection."""
    return max(REQUEST_INTERVAL_S, connections / REQUESTS_PER_S)


def stream_interval(connections: int) -> float:
    """Seconds between the writes of one streaming connection."""
    return max(STREAM_INTERVAL_S, connections / STREAM_WRITES_PER_S)


@dataclass
class RunResult:
    gap_ms: float | None
    error: str | None
    downtime_ms: float | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    requests: int | None = None  # requests answered (requests workload)
    over_200ms: int | None = None  # of which waited 200 ms or more
    baseline_ms: float | None = None  # the worst the peer saw before the move began
    kept: tuple[int, int] | None = None  # sockrepair: packets delivered from the lock, and left to retransmission
    later_ms: float | None = None  # the worst the peer saw of what it sent once the move (and handoff) had ended
    unacked: list[int] | None = None  # sockrepair: the peer's ports of the sockets restored with unacked output
    over_200ms_unacked: int | None = None  # requests >= 200 ms on those connections
    # sockrepair: time.monotonic() when the kept freeze began (MigrationReport.frozen_at); the move ends the downtime
    # and the handoff after it, not after the call's start: migrate() sets up for milliseconds before it freezes
    frozen_at: float | None = None


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


def kill_pid(pid: int) -> None:
    """A tree criu restored is no longer our child: kill it by pid (the namespace's deletion would, too)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.wait(30)


def criu_dump(criu: Criu, images: Path, pid: int, lock: str, timeout: float) -> str | None:
    """`criu dump` of `pid`'s tree into `images` with network lock method `lock`, in the caller's namespace: None,
    or why it failed (the first error of its log)."""
    done = criu.run(["dump", "-t", str(pid), "-D", str(images), "--tcp-established", "--network-lock", lock,
                     "-o", "dump.log"], timeout=timeout)
    return None if done.returncode == 0 else f"criu dump failed: {_criu_error(images / 'dump.log', done.stderr)}"


def criu_restore(criu: Criu, images: Path, lock: str, timeout: float, *extra: str) -> str | None:
    """`criu restore` of `images` (detached, with `extra` arguments) in the caller's namespace: None, or why it
    failed."""
    done = criu.run(["restore", "-D", str(images), "--tcp-established", "--network-lock", lock, "-d",
                     "-o", "restore.log", *extra], timeout=timeout)
    return None if done.returncode == 0 else f"criu restore failed: {_criu_error(images / 'restore.log', done.stderr)}"


def move_with_criu(criu: Criu, ns: NetNS, pid: int, reap: Callable[[], None], lock: str, work: Path,
                   timeout: float = CRIU_TIMEOUT) -> RunResult:
    images = work / "images"
    images.mkdir()
    start = time.monotonic()
    with ns.entered():
        failed = criu_dump(criu, images, pid, lock, timeout)
    dumped = time.monotonic()
    if failed:
        return RunResult(None, failed)
    reap()  # the dumped root is our child: a zombie would hold its pid, and restore would fail
    with ns.entered():
        failed = criu_restore(criu, images, lock, timeout)
    restored = time.monotonic()
    if failed:
        return RunResult(None, failed)
    return RunResult(None, None, (restored - start) * 1000,
                     {"criu dump": (dumped - start) * 1000, "criu restore": (restored - dumped) * 1000})


def unacked_output(socks: Sequence[socket.socket], tuples: Sequence[Any]) -> list[int]:
    """The remote ports of the sockets (`tuples[i]` is socks[i]'s ConnTuple) that hold output the peer has not
    acknowledged (SIOCOUTQ > 0). A restored socket's send queue counts as sent: an answer the lock stopped on its
    way out goes out again only when the socket's retransmission timer fires (200 ms or more), and a
    request/response peer waits for it. (Output whose ACK the peer is still delaying counts too, and costs
    nothing: the requests >= 200 ms on these connections tell the two apart.)"""
    held = []
    for sock, tup in zip(socks, tuples):
        try:
            if struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0] > 0:
                held.append(int(tup.remote_port))
        except OSError:
            continue
    return held


def handing_off(unix_path: Path, seen: list[list[int]]) -> Callable[[list[socket.socket], list[Any]], None]:
    """The handoff to the receiver listening on `unix_path`; it appends unacked_output() of the sockets to `seen`."""
    def handoff(socks: list[socket.socket], tuples: list[Any]) -> None:
        seen.append(unacked_output(socks, tuples))
        send_over_unix(str(unix_path), socks, tuples)
        for s in socks:
            s.close()
    return handoff


def move_with_sockrepair(ns: NetNS, pid: int, unix_path: Path, profiler: cProfile.Profile | None = None,
                         keep: bool = True) -> RunResult:
    seen: list[list[int]] = []
    handoff = handing_off(unix_path, seen)

    with ns.entered():
        if profiler is not None:
            profiler.enable()
        try:
            report = migrate(pid, dest_netns=ns.name, handoff=handoff, keep=keep)
        finally:
            if profiler is not None:
                profiler.disable()
    return RunResult(None, None, report.downtime_ms, migrate_phases(report),
                     kept=(report.kept.delivered, report.kept.fell_back) if keep else None,
                     unacked=seen[0] if seen else None, frozen_at=report.frozen_at)


def move_ended(moved: RunResult, began: float) -> float | None:
    """time.monotonic() when the move ended (its downtime and handoff done), counted from its freeze when known,
    else from `began` (the call's start: criu); None when the move failed."""
    if moved.downtime_ms is None:
        return None
    start = moved.frozen_at if moved.frozen_at is not None else began
    return start + (moved.downtime_ms + moved.phases_ms.get("handoff", 0.0)) / 1000


def migrate_phases(report: MigrationReport) -> dict[str, float]:
    """The report's phases, plus `untimed`: the part of the downtime (freeze to unlock) that falls in none of them
    (finding the sockets in /proc, taking them with pidfd_getfd, closing the copies)."""
    phases = dict(report.phases_ms)
    inside = sum(ms for name, ms in phases.items() if name != "handoff")
    phases["untimed"] = max(0.0, report.downtime_ms - inside)
    return phases


class Peer:
    """The workload's peer program, started and stopped alike whatever it is (`round_interval`: seconds between
    ping-pong rounds)."""

    def __init__(self, workload: str, addr: str, port: int, connections: int, netns: str | None,
                 timeout: float, round_interval: float = 0.0) -> None:
        if workload not in WORKLOADS:
            raise BenchmarkError(f"unknown workload {workload!r} (workloads: {', '.join(WORKLOADS)})", part="gap")
        self.workload, self.timeout = workload, timeout
        self.pingpong: PingPongClient | None = None
        self.requests: RequestClient | None = None
        if workload == "pingpong":
            self.pingpong = PingPongClient(addr, port, connections, netns=netns, interval=round_interval,
                                           round_timeout=timeout, max_seconds=2 * CRIU_TIMEOUT)
        elif workload == "requests":
            self.requests = RequestClient(addr, port, connections, netns=netns, size=REQUEST_BYTES,
                                          interval=request_interval(connections), timeout=timeout,
                                          max_seconds=2 * CRIU_TIMEOUT)
        else:
            self.requests = RequestClient(addr, port, connections, netns=netns, mode="stream", size=STREAM_BYTES,
                                          interval=stream_interval(connections), timeout=timeout,
                                          max_seconds=2 * CRIU_TIMEOUT)

    def stop(self) -> dict[str, Any]:
        if self.pingpong is not None:
            return self.pingpong.stop(sweep_timeout=self.timeout)
        assert self.requests is not None
        return self.requests.stop()

    def close(self) -> None:
        for peer in (self.pingpong, self.requests):
            if peer is not None:
                peer.close()


def peer_figures(report: dict[str, Any], began: float, ended: float | None = None,
                 unacked_ports: Sequence[int] | None = None) -> dict[str, Any]:
    """What a peer's report says about the move that began at `began` and ended at `ended` (time.monotonic(); None:
    not known): gap_s (the worst after it began, or None), baseline_s (the worst before it: the machine's noise),
    later_s (the worst of what was due after it ended: noise too, unless it waited behind an answer the move held
    back), requests and over_200ms (requests workload, else None), and over_200ms_unacked: how many of those were on
    the connections whose peer ports are `unacked_ports` (None when not given)."""
    slow = report.get("pauses" if report.get("mode") == "stream" else "slow", [])
    before = [took for start, took, *_ in slow if start + took < began]
    later = None if ended is None else max((took for start, took, *_ in slow if start >= ended), default=None)
    if "mode" not in report:  # the ping-pong client
        return {"gap_s": largest_gap_s(report, began), "baseline_s": max(before, default=None), "later_s": later,
                "requests": None, "over_200ms": None, "over_200ms_unacked": None}
    stream = report["mode"] == "stream"
    on_unacked = None
    if unacked_ports is not None and not stream:
        held, ports = set(unacked_ports), report.get("ports", [])
        on_unacked = sum(1 for _, took, conn in report.get("slow", [])
                         if took >= RTO_S and conn < len(ports) and ports[conn] in held)
    return {"gap_s": worst_after(report, began), "baseline_s": max(before, default=None), "later_s": later,
            "requests": None if stream else report.get("requests"),
            "over_200ms": None if stream else report.get("over_200ms"), "over_200ms_unacked": on_unacked}


def run_once(variant: str, connections: int, plan: Plan, criu: Criu | None,
             profiler: cProfile.Profile | None = None, workload: str = "pingpong") -> RunResult:
    """One move of `connections` connections with `variant` under `workload`, in a namespace made for it and
    deleted after; sockrepair's migrate() runs under `profiler` when one is given."""
    sockrepair = variant in SOCKREPAIR_IMPLS
    timeout = plan.timeout_s or (SOCKREPAIR_TIMEOUT if sockrepair else ROUND_TIMEOUT)
    with NetNS() as ns, tempfile.TemporaryDirectory(prefix="sockrepair-gap-") as tmp:
        work = Path(tmp)
        port = _free_port(ns)
        server = receiver = None
        peer: Peer | None = None
        moved: RunResult | None = None
        try:
            server = start_echo(f"{ADDR}:{port}", netns=ns.name, log=work / "echo.out")
            if sockrepair:
                receiver = start_receiver(work / "receiver.sock", netns=ns.name, max_seconds=CRIU_TIMEOUT)
            peer = Peer(workload, ADDR, port, connections, ns.name, timeout)
            time.sleep(plan.settle_s)
            began = time.monotonic()
            try:
                if sockrepair:
                    moved = move_with_sockrepair(ns, server.pid, work / "receiver.sock", profiler,
                                                 keep=variant == SOCKREPAIR_IMPL)
                else:
                    assert criu is not None
                    srv = server
                    moved = move_with_criu(criu, ns, server.pid, lambda: _reap(srv), variant.split("-", 1)[1],
                                           work, plan.timeout_s or CRIU_TIMEOUT)
            except (SockrepairError, OSError) as exc:
                moved = RunResult(None, f"{type(exc).__name__}: {exc}")
            time.sleep(plan.after_s)
            report = peer.stop()
            peer = None
        except ProcessError as exc:
            return RunResult(None, str(exc))
        finally:
            if peer is not None:
                peer.close()
            stop(receiver)
            if server is not None:
                pid = server.pid
                stop(server)
                if not sockrepair:
                    kill_pid(pid)
    return _outcome(moved, report, began)


def _outcome(moved: RunResult, report: dict[str, Any], began: float) -> RunResult:
    figures = peer_figures(report, began, move_ended(moved, began), moved.unacked)
    errors = ([moved.error] if moved.error else []) + list(report.get("errors", []))
    if not report.get("swept") and not errors:
        errors.append("the peer did not check every connection after the move")
    return from_figures(moved, figures, errors)


def from_figures(moved: RunResult, figures: dict[str, Any], errors: list[str]) -> RunResult:
    """A run's result from the move's and the peer's figures (peer_figures())."""
    ms = {k: None if figures[k] is None else figures[k] * 1000 for k in ("gap_s", "baseline_s", "later_s")}
    return RunResult(ms["gap_s"], "; ".join(errors) or None, moved.downtime_ms, moved.phases_ms,
                     figures["requests"], figures["over_200ms"], ms["baseline_s"], moved.kept, ms["later_s"],
                     moved.unacked, figures["over_200ms_unacked"])


def _schedule(plan: Plan, variants: Sequence[str], counts: Sequence[int] | None,
              workloads: Sequence[str] = WORKLOADS) -> list[tuple[str, str, int]]:
    """Runs interleaved: round k holds the k-th run of every (workload, variant, connections) that has one."""
    planned = {w: plan.runs.get(w, {}) for w in workloads}
    cases = [(w, v, n) for w in workloads for n in sorted({n for v in variants for n in planned[w].get(v, {})})
             for v in variants if n in planned[w].get(v, {}) and (counts is None or n in counts)]
    rounds = max((plan.runs[w][v][n] for w, v, n in cases), default=0)
    return [(w, v, n) for k in range(rounds) for w, v, n in cases if k < plan.runs[w][v][n]]


def run(quick: bool = False, progress: Progress | None = None, variants: Sequence[str] = VARIANTS,
        counts: Sequence[int] | None = None, workloads: Sequence[str] = WORKLOADS) -> dict[str, Any]:
    """{"gap": [Gap], "notes": [str]}; criu variants are left out with a note when criu is not usable here."""
    say = progress or (lambda _text: None)
    plan = QUICK if quick else FULL
    notes: list[str] = []
    criu: Criu | None = None
    if any(v not in SOCKREPAIR_IMPLS for v in variants):
        try:
            criu = find_criu().require_working()
        except CriuError as exc:
            notes.append(f"criu variants of the peer-gap benchmark skipped: {exc}")
            variants = [v for v in variants if v in SOCKREPAIR_IMPLS]
    raise_fd_limit()
    results: dict[tuple[str, str, int], list[RunResult]] = {}
    schedule = _schedule(plan, variants, counts, workloads)
    for i, (workload, variant, n) in enumerate(schedule, 1):
        say(f"gap {i}/{len(schedule)}: {workload}, {variant}, {connections(n)}")
        outcome = run_once(variant, n, plan, criu, workload=workload)
        results.setdefault((workload, variant, n), []).append(outcome)
        say("    " + describe(workload, outcome))
    return {"gap": [entry(variant, n, runs, workload) for (workload, variant, n), runs in results.items()],
            "notes": notes}


def describe(workload: str, outcome: RunResult) -> str:
    """One run as a progress line."""
    what = {"requests": "worst request", "stream": "longest pause"}.get(workload, "largest gap")
    text = f"{what} " + ("—" if outcome.gap_ms is None else f"{outcome.gap_ms:.2f} ms")
    if outcome.over_200ms is not None:
        text += f", {outcome.over_200ms} of {outcome.requests} requests >= 200 ms"
    if outcome.kept is not None:
        text += f", {outcome.kept[0]} packets kept and delivered, {outcome.kept[1]} left to retransmission"
    if outcome.unacked is not None:
        text += f", {len(outcome.unacked)} socket(s) restored with unacknowledged output"
    if outcome.over_200ms_unacked is not None:
        text += f" ({outcome.over_200ms_unacked} requests >= 200 ms on them)"
    return text + (f"; FAILED: {outcome.error}" if outcome.error else "")


def entry(impl: str, connections: int, runs: Sequence[RunResult], workload: str = "pingpong") -> Gap:
    good = [r for r in runs if r.error is None and r.gap_ms is not None]
    failed = next((r.error for r in runs if r.error is not None), None)
    interval = {"requests": request_interval, "stream": stream_interval}.get(workload)
    return gap_from_runs(impl, connections, [r.gap_ms for r in good if r.gap_ms is not None], failed is None,
                         failed, [r.downtime_ms for r in good if r.downtime_ms is not None],
                         [r.phases_ms for r in good], workload=workload,
                         requests=[r.requests for r in good if r.requests is not None],
                         over_200ms=[r.over_200ms for r in good if r.over_200ms is not None],
                         baselines_ms=[r.baseline_ms for r in good if r.baseline_ms is not None],
                         laters_ms=[r.later_ms for r in good if r.later_ms is not None],
                         kept=[r.kept for r in good if r.kept is not None],
                         unacked=[len(r.unacked) for r in good if r.unacked is not None],
                         over_200ms_unacked=[r.over_200ms_unacked for r in good if r.over_200ms_unacked is not None],
                         interval_ms=None if interval is None else interval(connections) * 1000)


def _print(gaps: Sequence[Gap]) -> None:
    for g in sorted(gaps, key=lambda g: (g.get("workload", "pingpong"), g["connections"], g["impl"])):
        state = "" if g["verified"] else f"  NOT VERIFIED: {g.get('error')}"
        gap = "—" if math.isnan(g["gap_ms"]) else f"{g['gap_ms']:10.2f} ms"
        slow = f", {g['over_200ms']} of {g['requests']} requests >= 200 ms" if "over_200ms" in g else ""
        print(f"{g.get('workload', 'pingpong'):<9}{g['connections']:>6} {g['impl']:<20} gap {gap}{slow} over "
              f"{g['runs']} runs{state}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 connections, one run per case")
    parser.add_argument("--json", metavar="OUT", help="also write the entries here")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    parser.add_argument("--counts", default="", help="connection counts to run (comma list; default: the plan's)")
    args = parser.parse_args()
    counts = [int(v) for v in args.counts.split(",") if v] or None
    out = run(args.quick, lambda text: print(text, file=sys.stderr, flush=True), args.variants.split(","), counts,
              args.workloads.split(","))
    for note in out["notes"]:
        print(note, file=sys.stderr)
    _print(out["gap"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(g["verified"] for g in out["gap"]) else 1


if __name__ == "__main__":
    sys.exit(main())
