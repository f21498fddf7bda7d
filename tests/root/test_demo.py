"""The README's first command: `sockrepair demo` moves live connections across hosts and proves it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.root.conftest import leaked_namespaces, namespaces


def test_demo_moves_every_byte_and_cleans_up():
    before = namespaces()
    done = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "demo", "--json", "--seconds", "1.5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["client"]["errors"] == []
    assert report["client"]["bytes_verified"] > 0
    # every request the clients answered was timed: the summary gives the worst and how many waited >= 200 ms
    client = report["client"]
    assert client["requests"] > 0 and sum(client["histogram"]["counts"]) == client["requests"]
    assert client["requests_over_200ms"] == sum(client["histogram"]["counts"][-5:])
    assert client["worst_request_ms"] >= client["worst_since_move_ms"] > 0
    assert "request latency: worst" in done.stderr
    kept = report["migration"]["kept"]
    assert kept["recording"] is True
    assert len(report["migration"]["connections"]) == 3
    assert all(w["ok"] and w["problems"] == [] for w in report["wire"])
    assert all(d["rst"] == 0 and d["syn"] == 0 and d["fin"] == 0 for w in report["wire"] for d in w["directions"])
    assert "[7/7]" in done.stderr  # progress was shown
    assert leaked_namespaces(before) == set(), "the demo left namespaces behind"
