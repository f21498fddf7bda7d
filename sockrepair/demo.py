"""`sockrepair demo`: three hosts (peer, A, B) on a bridge; a plain echo service on A; independent clients on the
peer send requests at random (Poisson) times on several connections while sockrepair moves them, with the service
address, to an echo program on B started before the move, which takes them over a UNIX socket (SCM_RIGHTS). Every
echoed byte is verified by the clients, every request's latency is timed, and the peer's wire is recorded and
checked (no RST/SYN/FIN, continuity)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from sockrepair.check import probe
from sockrepair.errors import UnsupportedError
from sockrepair.lab.hosts import SERVICE4, Lab
from sockrepair.lab.programs.requester import RTO_S
from sockrepair.lab.recorder import Recorder, wall_clock
from sockrepair.lab.subjects import (
    RequestClient,
    start_echo,
    start_receiver,
    stop,
    worst_after,
)
from sockrepair.lock import nft_status
from sockrepair.move.handoff import send_over_unix
from sockrepair.move.migrate import migrate
from sockrepair.state import ConnTuple

PORT = 7000
STEPS = 7
REQUEST_INTERVAL = 0.005  # mean seconds between a connection's requests
REQUEST_BYTES = 64
TIMEOUT = 10.0
RTO_MS = RTO_S * 1000  # what the request client counts requests_over_200ms with


class Progress:
    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.n = 0
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        self.n += 1
        elapsed = time.perf_counter() - self.start
        print(f"[{self.n}/{STEPS}] {elapsed:6.2f}s  {text}", file=self.out, flush=True)


def _preflight() -> None:
    report = probe()
    if not report.repair_works:
        failed = "; ".join(f"{f.name}: {f.detail}" for f in report.features if f.required and not f.ok)
        raise UnsupportedError(f"TCP repair cannot work here ({failed}); see `sockrepair check`")
    lock = nft_status()
    if not lock["available"]:
        raise UnsupportedError(f"the network lock cannot work here: {lock['detail']}")


def _summary(report: dict[str, Any], connections: int, began: float) -> dict[str, Any]:
    """The clients' report as the demo shows it (milliseconds), with the peer's local ports under "ports"; `began`:
    time.monotonic() when the move began."""
    errors = list(report.get("errors", []))
    if not report.get("swept") and not errors:
        errors.append("the client did not check every connection after the move")
    worst = report.get("worst") or (0.0, 0.0)
    median = report.get("median_s") or 0.0
    since = worst_after(report, began) or 0.0
    before = max((took for due, took, _ in report.get("slow", []) if due + took < began), default=0.0)
    return {"ok": not errors, "connections": connections, "requests": report.get("requests", 0),
            "bytes_verified": report.get("bytes_verified", 0), "errors": errors,
            "worst_request_ms": round(worst[1] * 1000, 3), "median_request_ms": round(median * 1000, 3),
            "worst_since_move_ms": round(since * 1000, 3), "worst_before_move_ms": round(before * 1000, 3),
            "requests_over_200ms": report.get("over_200ms", 0), "histogram": report.get("histogram"),
            "ports": list(report.get("ports", []))}


def run_demo(json_output: bool = False, seconds: float = 3.0, connections: int = 3) -> int:
    progress = Progress(sys.stderr)
    _preflight()
    result: dict[str, Any] = {}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="sockrepair-demo-") as tmp:
        progress(f"hosts peer {lab.peer.addr4}, A {lab.a.addr4}, B {lab.b.addr4} on one bridge; "
                 f"service address {SERVICE4} on A")
        old = start_echo(f"{SERVICE4}:{PORT}", netns=lab.a.name)
        unix_path = Path(tmp) / "receiver.sock"
        new: subprocess.Popen[bytes] | None = None
        client: RequestClient | None = None
        recorder: Recorder | None = None
        try:
            # started before the move: the connections go to a program already running, not one started for them
            new = start_receiver(unix_path, netns=lab.b.name, max_seconds=600.0)
            progress(f"plain echo service on A (pid {old.pid}, no sockrepair inside) on {SERVICE4}:{PORT}; "
                     f"plain echo program on B (pid {new.pid}) waiting for connections on {unix_path.name}")
            client = RequestClient(SERVICE4, PORT, connections, netns=lab.peer.name, size=REQUEST_BYTES,
                                   interval=REQUEST_INTERVAL, timeout=TIMEOUT)
            # recorded from after the handshakes to before the closes: any SYN or FIN seen is the migration's
            recorder = Recorder(lab.peer.ifname, lab.peer.name).start()
            progress(f"clients on the peer: {connections} connections, {REQUEST_BYTES}-byte requests at random times "
                     f"(Poisson, mean {REQUEST_INTERVAL * 1000:g} ms each), every echoed byte verified, every "
                     "request timed; recording the peer's wire")
            time.sleep(seconds / 2)

            def handoff(socks: list[socket.socket], tuples: list[ConnTuple]) -> None:
                send_over_unix(str(unix_path), socks, tuples)
                for s in socks:
                    s.close()

            began = time.monotonic()
            report = migrate(old.pid, dest_netns=lab.b.name, network=lambda: lab.move_service("a", "b"),
                             handoff=handoff)
            # the wire's window from the kept freeze (migrate() sets up for milliseconds before it; the frames carry
            # wall-clock stamps); the requests' from the call, which a busy program's earlier freezes stalled too
            frozen_at = wall_clock(report.frozen_at)
            resumed_at = frozen_at + report.downtime_ms / 1000
            phases = ", ".join(f"{k} {v:.2f}" for k, v in report.phases_ms.items())
            kept = report.kept
            progress(f"moved {len(report.connections)} connections to B in {report.downtime_ms:.1f} ms "
                     f"(freeze to unlock) and handed them to pid {new.pid}; the lock kept {kept.delivered} "
                     f"packet(s) the clients sent meanwhile and delivered them to the restored sockets "
                     f"({kept.fell_back} left to retransmission); phases ms: {phases}")
            time.sleep(seconds / 2)
            frames = recorder
            recorder = None
            frames.stop()
            talk = _summary(client.stop(), connections, began)
            client = None
            progress(f"clients stopped: {talk['requests']} requests, {talk['bytes_verified']} bytes verified, "
                     f"{'no errors' if talk['ok'] else 'ERRORS: ' + '; '.join(talk['errors'])}; request latency: "
                     f"worst {talk['worst_since_move_ms']:.1f} ms from the move on "
                     f"({talk['worst_before_move_ms']:.1f} ms before it), median {talk['median_request_ms']:.2f} ms, "
                     f"{talk['requests_over_200ms']} waited {RTO_MS:g} ms or more (a retransmission timeout)")
            wires = [frames.report(ConnTuple(socket.AF_INET, lab.peer.addr4, port, SERVICE4, PORT),
                                     frozen_at, resumed_at) for port in talk.pop("ports")]
            for w in wires:
                gap = w.wire_gap.seconds if w.wire_gap and w.wire_gap.seconds is not None else None
                verdict = "ok" if w.ok else "PROBLEMS: " + "; ".join(w.problems)
                gap_text = f"{gap * 1000:.1f} ms" if gap is not None else "n/a"
                print(f"        wire {w.tuple}: {w.segments} segments, {verdict}; wire gap {gap_text}",
                      file=sys.stderr)
            print("        (a wire gap runs from a connection's last segment before the freeze to its first after "
                  "the unlock: the move plus the idle time of the random requests around it. A request sent while "
                  "its connection was locked is kept by the lock and delivered after the restore; with the dropping "
                  "lock, `migrate(keep=False)`, it would wait for the client's retransmission timeout, 200 ms or "
                  "more)", file=sys.stderr)
            ok = talk["ok"] and all(w.ok for w in wires) and talk["requests"] > 0
            progress("verified: " + ("every byte arrived once and in order, no RST/SYN/FIN on the wire"
                                     if ok else "FAILED (see above)"))
            result = {"ok": ok, "migration": report.to_dict(), "client": talk,
                      "wire": [w.to_dict() for w in wires]}
        finally:
            # an interrupt or an error: the recorder and the clients stop before the lab that holds them is deleted
            if recorder is not None:
                recorder.stop()
            if client is not None:
                client.close()
            stop(old)
            stop(new)
    progress("hosts, processes and locks cleaned up")
    if json_output:
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
    return 0 if result.get("ok") else 1
