"""The processes a migration benchmark moves and watches, each started inside a network namespace (joined with
setns, never `ip netns exec`: criu must see the namespace's network only, not a new mount namespace):

- the subject: sockrepair's plain echo program (sockrepair/programs/echo_server.py) listening on ADDR:PORT;
- the peer: sockrepair/bench/gap_programs.py client, logging each round trip;
- the receiver: sockrepair/bench/gap_programs.py receiver, which takes restored sockets over a UNIX socket."""

from __future__ import annotations

import contextlib
import json
import resource
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from sockrepair.errors import SockrepairError
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.netns import named

PROGRAMS = Path(__file__).with_name("gap_programs.py")
START_TIMEOUT = 60.0  # 10,000 connections with one checked round each take a few seconds


class SubjectError(SockrepairError):
    """A benchmark's helper process did not start or did not report."""


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one, here and so in every child: 10,000 connections need 10,000 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def read_line(stream: IO[str], timeout: float, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise SubjectError(f"{what} said nothing within {timeout:g} s")
    return stream.readline()


def stop(proc: subprocess.Popen[str] | None) -> None:
    """Kill and reap a helper (if still ours), closing its pipes."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def start_echo(netns: str | None, addr: str, port: int, log: Path) -> subprocess.Popen[str]:
    """The subject, in its own session with its output in a file: criu restores neither a controlling terminal nor
    a pipe to a process outside the tree, but a file it does."""
    with named(netns), log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(ECHO_SERVER), "--listen", f"{addr}:{port}"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not log.read_text().startswith("ready"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SubjectError(f"the echo program did not start: {log.read_text().strip() or 'no output'}")
        time.sleep(0.01)
    return proc


def start_receiver(netns: str | None, unix_path: Path, max_seconds: float) -> subprocess.Popen[str]:
    with named(netns):
        proc = subprocess.Popen([sys.executable, str(PROGRAMS), "receiver", "--unix", str(unix_path),
                                 "--max-seconds", str(max_seconds)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        line = read_line(proc.stdout, START_TIMEOUT, "the receiver")
    except SubjectError:
        stop(proc)
        raise
    if line.strip() != "ready":
        stop(proc)
        raise SubjectError(f"the receiver did not start ({line.strip() or 'no output'})")
    return proc


class GapClient:
    """The peer: N connections to ADDR:PORT doing ping-pong rounds until stop()."""

    def __init__(self, netns: str | None, addr: str, port: int, connections: int, *, interval: float = 0.0,
                 round_timeout: float = 60.0, max_seconds: float = 600.0) -> None:
        argv = [sys.executable, str(PROGRAMS), "client", "--addr", addr, "--port", str(port),
                "--connections", str(connections), "--interval", str(interval),
                "--round-timeout", str(round_timeout), "--max-seconds", str(max_seconds)]
        self.round_timeout = round_timeout
        with named(netns):
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        try:
            line = read_line(self.proc.stdout, START_TIMEOUT, "the ping-pong client")
        except SubjectError:
            stop(self.proc)
            raise
        if line.strip() != "ready":
            report = self._report(5.0)
            stop(self.proc)
            raise SubjectError(f"the ping-pong client could not connect: {'; '.join(report.get('errors', []))}")

    def _report(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = read_line(self.proc.stdout, timeout, "the ping-pong client")
            return dict(json.loads(line))
        except (SubjectError, json.JSONDecodeError) as exc:
            return {"errors": [f"no report from the client: {exc}"], "slow": [], "rounds": 0, "swept": False}

    def stop(self, sweep_timeout: float) -> dict[str, Any]:
        """Ends the rounds; the client checks every connection once more, then reports (see gap_programs.py)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        report = self._report(sweep_timeout + self.round_timeout)
        stop(self.proc)
        return report

    def close(self) -> None:
        stop(self.proc)


def largest_gap_s(report: dict[str, Any], since: float) -> float | None:
    """The longest round trip that ended after `since` (time.monotonic() when the migration began), or None when
    the client timed nothing."""
    late = [took for start, took in report.get("slow", []) if start + took >= since]
    if late:
        return max(late)
    slowest = report.get("slowest")
    return slowest[1] if slowest and report.get("rounds") else None
