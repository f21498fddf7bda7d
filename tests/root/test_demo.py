"""The README's first command: `sockrepair demo` moves live connections across hosts and proves it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

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
    assert kept["recording"] is True and kept["fell_back"] == 0
    # the headline: no client waited a retransmission timeout across the move
    assert client["requests_over_200ms"] == 0, client
    assert len(report["migration"]["connections"]) == 3
    assert all(w["ok"] and w["problems"] == [] for w in report["wire"])
    assert all(d["rst"] == 0 and d["syn"] == 0 and d["fin"] == 0 for w in report["wire"] for d in w["directions"])
    assert "[7/7]" in done.stderr  # progress was shown
    assert leaked_namespaces(before) == set(), "the demo left namespaces behind"



def _demo_signalled(disposition: str, seconds: str) -> tuple[int, str]:
    """Run the demo with SIGINT's disposition set to `disposition` ("default_int_handler" or "SIG_IGN"; set here,
    whatever this test's runner gives its children), send it SIGINT while its clients run; its exit status and the
    rest of its stderr."""
    script = (f"import runpy, signal, sys; signal.signal(signal.SIGINT, signal.{disposition}); "
              f"sys.argv = ['sockrepair', 'demo', '--seconds', '{seconds}']; "
              "runpy.run_module('sockrepair.cli.main', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("[3/7]"):
                break
        assert seen and seen[-1].startswith("[3/7]"), "".join(seen)
        time.sleep(0.5)  # the clients and the wire recorder at work
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        return proc.wait(timeout=120), rest
    finally:
        proc.kill()
        proc.wait()


def test_an_interrupted_demo_says_one_line_and_cleans_up():
    before = namespaces()
    status, rest = _demo_signalled("default_int_handler", "30")
    assert status == 130
    assert "Traceback" not in rest and "Exception in thread" not in rest, rest
    assert rest.strip().splitlines()[-1] == "sockrepair: interrupted"
    assert leaked_namespaces(before) == set(), "the interrupted demo left namespaces behind"


def test_an_ignored_sigint_leaves_the_demo_alone():
    """Started with SIGINT ignored (nohup, a background job of a script): the signal changes nothing. The lab was
    deleted under the running demo before, its recorder died with a traceback and the demo failed."""
    before = namespaces()
    status, rest = _demo_signalled("SIG_IGN", "2")
    assert status == 0, rest
    assert "Traceback" not in rest and "Exception in thread" not in rest, rest
    assert "verified: every byte arrived once and in order" in rest
    assert leaked_namespaces(before) == set(), "the demo left namespaces behind"
