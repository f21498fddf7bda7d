"""`sockrepair demo`: three hosts (peer, A, B) on a bridge; a plain echo service on A; a client on the peer keeps
several connections busy while sockrepair moves them, with the service address, to a new echo program on B. Every
echoed byte is verified by the client, and the peer's wire is recorded and checked (no RST/SYN/FIN, continuity)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import IO, Any

from sockrepair.check import probe
from sockrepair.errors import UnsupportedError
from sockrepair.lab.hosts import SERVICE4, Lab
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.lab.recorder import Recorder
from sockrepair.lab.subjects import PingPongClient, start_echo, stop, wait_ready
from sockrepair.lock import nft_status
from sockrepair.move.handoff import spawn_with_sockets
from sockrepair.move.migrate import migrate
from sockrepair.state import ConnTuple

PORT = 7000
STEPS = 7
ROUND_INTERVAL = 0.0005
CHUNK = 2048
ROUND_TIMEOUT = 10.0


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


def _summary(report: dict[str, Any], connections: int) -> dict[str, Any]:
    """The client's report as the demo shows it (milliseconds), with the peer's local ports under "ports"."""
    errors = list(report.get("errors", []))
    if not report.get("swept") and not errors:
        errors.append("the client did not check every connection after the move")
    slowest = report.get("slowest") or (0.0, 0.0)
    median = report.get("median_rtt_s") or 0.0
    return {"ok": not errors, "connections": connections, "rounds": report.get("rounds", 0),
            "bytes_verified": report.get("bytes_verified", 0), "errors": errors,
            "max_gap_ms": round(slowest[1] * 1000, 3), "median_rtt_ms": round(median * 1000, 3),
            "ports": list(report.get("ports", []))}


def run_demo(json_output: bool = False, seconds: float = 3.0, connections: int = 3) -> int:
    progress = Progress(sys.stderr)
    _preflight()
    result: dict[str, Any] = {}
    with Lab() as lab:
        progress(f"hosts peer {lab.peer.addr4}, A {lab.a.addr4}, B {lab.b.addr4} on one bridge; "
                 f"service address {SERVICE4} on A")
        old = start_echo(f"{SERVICE4}:{PORT}", netns=lab.a.name)
        new: subprocess.Popen[bytes] | None = None
        client: PingPongClient | None = None
        try:
            progress(f"plain echo service on A (pid {old.pid}, no sockrepair inside) on {SERVICE4}:{PORT}")
            client = PingPongClient(SERVICE4, PORT, connections, netns=lab.peer.name, chunk=CHUNK,
                                    interval=ROUND_INTERVAL, round_timeout=ROUND_TIMEOUT)
            # recorded from after the handshakes to before the closes: any SYN or FIN seen is the migration's
            recorder = Recorder(lab.peer.ifname, lab.peer.name).start()
            progress(f"client on the peer: {connections} connections, verifying every echoed byte; "
                     f"recording the peer's wire")
            time.sleep(seconds / 2)

            def handoff(socks: list[socket.socket], tuples: list[ConnTuple]) -> subprocess.Popen[bytes]:
                with lab.b.entered():
                    proc = spawn_with_sockets([sys.executable, str(ECHO_SERVER)], socks, tuples,
                                              stdout=subprocess.PIPE)
                for s in socks:
                    s.close()
                wait_ready(proc, "the echo program on B")
                return proc

            frozen_at = time.time()
            report = migrate(old.pid, dest_netns=lab.b.name, network=lambda: lab.move_service("a", "b"),
                             handoff=handoff)
            resumed_at = frozen_at + report.downtime_ms / 1000
            new = report.handoff_result
            phases = ", ".join(f"{k} {v:.2f}" for k, v in report.phases_ms.items())
            progress(f"moved {len(report.connections)} connections to B in {report.downtime_ms:.1f} ms "
                     f"(freeze to unlock); new echo program pid {new.pid if new else '?'}; phases ms: {phases}")
            time.sleep(seconds / 2)
            recorder.stop()
            talk = _summary(client.stop(sweep_timeout=ROUND_TIMEOUT), connections)
            client = None
            progress(f"client stopped: {talk['rounds']} round trips, {talk['bytes_verified']} bytes verified, "
                     f"{'no errors' if talk['ok'] else 'ERRORS: ' + '; '.join(talk['errors'])}; "
                     f"largest gap {talk['max_gap_ms']:.1f} ms (median round trip {talk['median_rtt_ms']:.2f} ms)")
            wires = [recorder.report(ConnTuple(socket.AF_INET, lab.peer.addr4, port, SERVICE4, PORT),
                                     frozen_at, resumed_at) for port in talk.pop("ports")]
            for w in wires:
                gap = w.wire_gap.seconds if w.wire_gap and w.wire_gap.seconds is not None else None
                verdict = "ok" if w.ok else "PROBLEMS: " + "; ".join(w.problems)
                gap_text = f"{gap * 1000:.1f} ms" if gap is not None else "n/a"
                print(f"        wire {w.tuple}: {w.segments} segments, {verdict}; wire gap {gap_text}",
                      file=sys.stderr)
            print("        (a round trip the client started while its connection was locked waits for the client's own "
                  "retransmission timeout, about 200 ms: the lock drops packets, it does not hold them back)", file=sys.stderr)
            ok = talk["ok"] and all(w.ok for w in wires) and talk["rounds"] > 0
            progress("verified: " + ("every byte arrived once and in order, no RST/SYN/FIN on the wire"
                                     if ok else "FAILED (see above)"))
            result = {"ok": ok, "migration": report.to_dict(), "client": talk,
                      "wire": [w.to_dict() for w in wires]}
        finally:
            if client is not None:
                client.close()
            stop(old)
            stop(new)
    progress("hosts, processes and locks cleaned up")
    if json_output:
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
    return 0 if result.get("ok") else 1
