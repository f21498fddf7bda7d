"""Starting, watching and stopping the lab's plain programs (sockrepair/lab/programs/), for the demo, the benchmarks
and the tests alike. Each runs as `sys.executable PATH`, inside a network namespace joined with setns (never
`ip netns exec`, whose new mount namespace criu refuses to dump), and every wait for one is bounded: a program that
does not start, or stops talking, is killed and raises ProcessError (`.pid`) instead of hanging its caller.

- the subject: start_echo(), the echo server listening on ADDR:PORT;
- the peer: PingPongClient, N connections doing checked ping-pong rounds until stop(), then a JSON report; or
  RequestClient, N independent request/response clients with Poisson arrivals, or N connections streaming both ways;
- the receiver: start_receiver(), which takes restored sockets over a UNIX socket and echoes on them."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from sockrepair.errors import ProcessError
from sockrepair.lab.programs import CLIENT, ECHO_SERVER, RECEIVER, REQUESTER
from sockrepair.netns import named

START_TIMEOUT = 60.0  # seconds; 10,000 connections with one checked round each take a few
STOP_TIMEOUT = 10.0  # seconds for a killed program to be reaped


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one, here and so in every child: 10,000 connections need 10,000 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Lines:
    """The lines a program writes to a pipe, each read with a deadline. The pipe is read with os.read, not through
    a buffered file: a buffered readline may swallow the next line too, and a later wait on the pipe would then
    miss it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buffer = bytearray()
        self.eof = False

    def read(self, timeout: float) -> str | None:
        """The next line without its newline; None when none came within `timeout` seconds or the pipe closed
        without one."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while b"\n" not in self.buffer and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            piece = os.read(self.fd, 1 << 16)
            self.eof = not piece
            self.buffer += piece
        if b"\n" not in self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill and reap a program (if still ours), closing its pipes."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(BrokenPipeError):  # "stop" still buffered for a program that had ended
                stream.close()


def wait_ready(proc: subprocess.Popen[bytes], what: str, timeout: float = START_TIMEOUT) -> str:
    """The first line `proc` prints on its stdout pipe, which must start with "ready" within `timeout` seconds;
    otherwise the program is stopped and ProcessError raised, naming it as `what`."""
    assert proc.stdout is not None
    line = _Lines(proc.stdout).read(timeout)
    if line is None or not line.startswith("ready"):
        stop(proc)
        said = f"said {line.strip()!r}" if line else f"said nothing within {timeout:g} s"
        raise ProcessError(f"{what} did not start ({said})", pid=proc.pid)
    return line


def start_echo(listen: str, *, netns: str | None = None, log: Path | None = None,
               timeout: float = START_TIMEOUT) -> subprocess.Popen[bytes]:
    """The echo server listening on `listen` ("ADDR:PORT", "[ADDR6]:PORT"), started in namespace `netns` (None: this
    one), returned once it said "ready". With `log`, its output goes to that file and it runs in its own session,
    as criu needs to dump it (criu restores neither a controlling terminal nor a pipe to a process outside the tree,
    but a file it does); otherwise to a pipe. Raises ProcessError when it does not start."""
    argv = [sys.executable, str(ECHO_SERVER), "--listen", listen]
    if log is None:
        with named(netns):
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        wait_ready(proc, "the echo program", timeout)
        return proc
    with named(netns), log.open("w") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while not log.read_text().startswith("ready"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise ProcessError(f"the echo program did not start: {log.read_text().strip() or 'no output'}",
                               pid=proc.pid)
        time.sleep(0.01)
    return proc


def start_receiver(unix_path: Path, *, netns: str | None = None, max_seconds: float = 3600.0,
                   timeout: float = START_TIMEOUT) -> subprocess.Popen[bytes]:
    """The receiver listening on the UNIX socket `unix_path`, in namespace `netns`, exiting by itself after
    `max_seconds`; returned once it said "ready". Raises ProcessError when it does not start."""
    with named(netns):
        proc = subprocess.Popen([sys.executable, str(RECEIVER), "--unix", str(unix_path),
                                 "--max-seconds", str(max_seconds)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    wait_ready(proc, "the receiver", timeout)
    return proc


class _Peer:
    """A peer program that prints "ready" (or "failed" and a report), runs until "stop" on stdin, then prints one
    JSON report line."""

    proc: subprocess.Popen[bytes]
    what = "the peer"

    def _start(self, argv: list[str], netns: str | None, timeout: float) -> None:
        with named(netns):
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self._lines = _Lines(self.proc.stdout)
        line = self._lines.read(timeout)
        if line is None or line.strip() != "ready":
            errors = self._report(5.0)["errors"] if line is not None else [f"said nothing within {timeout:g} s"]
            stop(self.proc)
            raise ProcessError(f"{self.what} could not connect: {'; '.join(errors)}", pid=self.proc.pid)

    def _report(self, timeout: float) -> dict[str, Any]:
        line = self._lines.read(timeout)
        try:
            if line is None:
                raise ValueError(f"nothing within {timeout:g} s")
            return dict(json.loads(line))
        except ValueError as exc:
            return {"errors": [f"no report from {self.what}: {exc}"], "slow": [], "rounds": 0, "requests": 0,
                    "swept": False, "ports": []}

    def _stop(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.flush()
        report = self._report(timeout)
        stop(self.proc)
        return report

    def close(self) -> None:
        stop(self.proc)


class RequestClient(_Peer):
    """The peer as users see it (lab/programs/requester.py): `connections` connections to addr:port from namespace
    `netns`; with mode "requests", each sends `size`-byte requests at Poisson arrivals of mean `interval` seconds
    and times every answer from the moment the request was due; with mode "stream", each writes `size` bytes every
    `interval` seconds while the echo streams back, and the longest pause in what comes back is timed. `timeout`
    bounds every wait for answers; `max_seconds` the whole run. Raises ProcessError when it does not start or cannot
    connect (its errors in the message)."""

    what = "the request client"

    def __init__(self, addr: str, port: int, connections: int, *, netns: str | None = None, mode: str = "requests",
                 size: int = 64, interval: float = 0.02, timeout: float = 60.0, max_seconds: float = 600.0,
                 seed: int | None = None, start_timeout: float = START_TIMEOUT) -> None:
        argv = [sys.executable, str(REQUESTER), "--addr", addr, "--port", str(port), "--connections",
                str(connections), "--mode", mode, "--size", str(size), "--interval", str(interval), "--timeout",
                str(timeout), "--max-seconds", str(max_seconds)]
        if seed is not None:
            argv += ["--seed", str(seed)]
        self.timeout = timeout
        self._start(argv, netns, start_timeout)

    def stop(self) -> dict[str, Any]:
        """Stops new requests; the client awaits every answer, checks every connection once more, then reports
        (see lab/programs/requester.py for the keys). Problems are in the report's "errors", never raised."""
        return self._stop(3 * self.timeout + 10.0)


def worst_after(report: dict[str, Any], since: float) -> float | None:
    """Seconds: the slowest request of a RequestClient report that was answered after `since` (time.monotonic() when
    the move began), or in stream mode its longest pause ending after `since`; None when nothing was timed."""
    stream = report.get("mode") == "stream"
    late = [took for start, took, *_ in report.get("pauses" if stream else "slow", []) if start + took >= since]
    if late:
        return float(max(late))
    if stream:
        longest = report.get("longest_pause")
        return float(longest[1]) if longest and longest[1] else None
    worst = report.get("worst")
    return float(worst[1]) if worst and report.get("requests") else None


class PingPongClient(_Peer):
    """The peer: `connections` connections to addr:port from namespace `netns`, each round sending `chunk` bytes
    of the connection's checkable stream and waiting for their echo, `interval` seconds apart, until stop().
    Raises ProcessError when the client does not start or cannot connect (its errors in the message)."""

    def __init__(self, addr: str, port: int, connections: int, *, netns: str | None = None, chunk: int = 64,
                 interval: float = 0.0, round_timeout: float = 60.0, max_seconds: float = 600.0,
                 timeout: float = START_TIMEOUT) -> None:
        argv = [sys.executable, str(CLIENT), "--addr", addr, "--port", str(port), "--connections", str(connections),
                "--chunk", str(chunk), "--interval", str(interval), "--round-timeout", str(round_timeout),
                "--max-seconds", str(max_seconds)]
        self.round_timeout = round_timeout
        self.what = "the ping-pong client"
        self._start(argv, netns, timeout)

    def stop(self, sweep_timeout: float) -> dict[str, Any]:
        """Ends the rounds; the client checks every connection once more, then reports (see lab/programs/client.py
        for the keys; times are time.monotonic() seconds). The report says what went wrong in "errors" rather
        than raising."""
        return self._stop(sweep_timeout + self.round_timeout)


def largest_gap_s(report: dict[str, Any], since: float) -> float | None:
    """The longest round trip of a PingPongClient report that ended after `since` (time.monotonic() when the
    migration began), or None when the client timed nothing."""
    late = [took for start, took in report.get("slow", []) if start + took >= since]
    if late:
        return float(max(late))
    slowest = report.get("slowest")
    return float(slowest[1]) if slowest and report.get("rounds") else None
