"""`sockrepair criu dump/restore` with the real criu: the seed scenario (a loopback client and server as two trees,
dumped separately, firewall wiped, restored in either order) continues without a reset; a tree holding both ends of
100 connections keeps every queued byte; what the driver refuses and reports. Everything runs in network namespaces
the tests create; criu and the programs join only the namespace's network (`NetNS.entered()`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sockrepair.cli.criu import add_criu_commands
from sockrepair.criu import driver, reap
from sockrepair.criu.locate import Criu
from sockrepair.criu.manifest import LOCK_SKIP
from sockrepair.criu.manifest import load as load_manifest
from sockrepair.criu.topology import PEER_EXTERNAL, PEER_TREE, map_trees
from sockrepair.errors import CriuError
from sockrepair.lab.recorder import Recorder
from sockrepair.lock import Locker
from sockrepair.move.procfs import stat
from sockrepair.netns import NetNS
from tests.clihelp import run_group

pytestmark = pytest.mark.root

HOLDER = Path(__file__).resolve().parent.parent / "data" / "criu" / "holder.py"
WAIT = 30.0


class Program:
    """holder.py in its own session (a tree of its own) inside `ns`. After a criu restore it runs under the same
    pid but is no longer our child: close() kills it by pid."""

    def __init__(self, ns: NetNS, work: Path, name: str, *args: str) -> None:
        self.ready = work / f"{name}.ready"
        self.out = work / f"{name}.out"
        with ns.entered(), self.out.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HOLDER), args[0], str(self.ready), *args[1:]],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = self.proc.pid
        self.started = stat(self.pid)
        deadline = time.monotonic() + WAIT
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"holder {args} did not start: {self.out.read_text()}")
            time.sleep(0.02)
        self.extra = [int(word) for word in self.ready.read_text().split()[1:]]

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait_output(self, done: Callable[[list[str]], bool]) -> list[str]:
        """The program's output once `done` says so, or whatever it is when time runs out (the caller asserts)."""
        deadline = time.monotonic() + WAIT
        while not done(self.lines()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.lines()

    def close(self) -> None:
        now = stat(self.pid)
        # Only the program itself (dumped, restored), never a process that got its pid meanwhile.
        if now is not None and self.started is not None and now.starttime == self.started.starttime:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            self.proc.wait()


@contextlib.contextmanager
def programs(*made: Program) -> Iterator[None]:
    try:
        yield
    finally:
        for p in made:
            p.close()


def locks_in(ns: NetNS) -> list[str]:
    with Locker(ns.name) as locker:
        return [str(r.tuple) for r in locker.list_locks()]


def wipe_firewall(ns: NetNS) -> None:
    """What a reboot does to the namespace's firewall: sockrepair's lock table goes too."""
    subprocess.run(ns.exec_argv(["nft", "flush", "ruleset"]), check=True)
    if shutil.which("iptables"):
        subprocess.run(ns.exec_argv(["iptables", "-F"]), check=True)


def counting(lines: list[str]) -> bool:
    return all(line.isdigit() for line in lines)


@pytest.mark.parametrize("order", [("server", "client"), ("client", "server")])
def test_seed_scenario_continues_exactly_in_either_restore_order(
    criu: Criu, ns: NetNS, work: Path, order: tuple[str, str]
) -> None:
    server = Program(ns, work, "server", "server", "7022")
    client = Program(ns, work, "client", "client", "7022")
    roots = {"server": server.pid, "client": client.pid}
    with programs(server, client), Recorder("lo", ns.name) as wire:
        assert len(client.wait_output(lambda lines: len(lines) >= 5)) >= 5, "the echo never got going"
        report = driver.dump([server.pid, client.pid], work / "img", criu=criu)
        assert [c.peer for c in report.topology.connections] == [PEER_TREE, PEER_TREE]
        assert report.network_lock == LOCK_SKIP and report.warnings == []
        assert ns.pids() == [], "the dumped trees must be gone (and reaped)"
        before = client.lines()
        assert before and counting(before)
        wipe_firewall(ns)
        assert locks_in(ns) == []
        with ns.entered():
            first = driver.restore(work / "img", [roots[order[0]]], criu=criu)
            assert first.released == [] and len(first.still_locked) == 2
            assert len(locks_in(ns)) == 2, "the lock must be back before the first restore"
            second = driver.restore(work / "img", [roots[order[1]]], criu=criu)
            assert len(second.released) == 2 and second.still_locked == []
        assert locks_in(ns) == []
        after = client.wait_output(lambda lines: len(lines) >= len(before) + 20 or not counting(lines))
    assert after[: len(before)] == before
    assert after == [str(n) for n in range(len(after))], f"the counter did not continue exactly: {after[-5:]}"
    assert len(after) >= len(before) + 20
    assert server.lines() == []
    # criu probes the kernel with throwaway loopback connections of its own: only the seed's connection counts.
    ports = {c.tuple.local_port for c in report.topology.connections}
    resets = [s for s in wire.segments() if s.has("R") and {s.src_port, s.dst_port} == ports]
    assert resets == [], f"{len(resets)} RST on the wire, first {resets[0]}"
    assert any({s.src_port, s.dst_port} == ports for s in wire.segments()), "the capture saw nothing of the seed"
    manifest = load_manifest(work / "img")
    assert all(t.restored for t in manifest.trees)


def criu_cli(*argv: str) -> tuple[int, str]:
    """`sockrepair criu ...` as the CLI runs it (the command group on a parser of its own)."""
    return run_group(add_criu_commands, "criu", *argv)


def test_tree_with_both_ends_of_100_connections_keeps_every_byte(criu: Criu, ns: NetNS, work: Path) -> None:
    """Through the CLI: `criu dump`, `criu show`, `criu restore`; then the restored program checks every byte."""
    pairs, payload = 100, 20000
    tree = Program(ns, work, "pairs", "pairs", str(pairs), "127.0.0.1", str(payload), "fill")
    (filled,) = tree.extra
    with programs(tree):
        code, text = criu_cli("dump", "--pid", str(tree.pid), "-D", str(work / "img"), "--json")
        dumped = json.loads(text)
        assert code == 0 and dumped["warnings"] == []
        conns = dumped["topology"]["connections"]
        assert len(conns) == 2 * pairs and {c["peer"] for c in conns} == {PEER_TREE}
        assert len(locks_in(ns)) == 2 * pairs
        states = json.loads(criu_cli("show", str(work / "img"), "--json")[1])["trees"][0]["connections"]
        assert len(states) == 2 * pairs
        queued = sum(s["recv_queue"]["length"] + s["send_queue"]["length"] for s in states)
        # Each stream is in the receiver's queue, the sender's, or (sent, not acknowledged) both.
        assert queued >= 2 * pairs * payload + filled
        with ns.entered():
            code, text = criu_cli("restore", "-D", str(work / "img"))
        assert code == 0 and text.splitlines()[:2] == [
            f"restored tree(s) {tree.pid} from {work / 'img'}", f"  released the lock of {2 * pairs} connection(s)"]
        assert locks_in(ns) == []
        os.kill(tree.pid, signal.SIGUSR1)
        lines = tree.wait_output(lambda lines: bool(lines))
    assert lines == [f"verified {2 * pairs} sockets, {2 * pairs * payload + filled} bytes"]


def test_dump_refuses_to_leave_a_loopback_peer_behind(criu: Criu, ns: NetNS, work: Path) -> None:
    server = Program(ns, work, "server", "server", "7022")
    client = Program(ns, work, "client", "client", "7022")
    with programs(server, client):
        with pytest.raises(CriuError, match=r"other end is held by .*" + str(client.pid)) as refused:
            driver.dump([server.pid], work / "img", criu=criu)
        assert "--allow-external-peers" in str(refused.value)
        assert not (work / "img").exists()
        topology = map_trees([server.pid])
        assert [(c.peer, c.peer_pids) for c in topology.connections] == [(PEER_EXTERNAL, [client.pid])]
        assert server.proc.poll() is None and client.proc.poll() is None
        assert locks_in(ns) == []


def failing_for(criu: Criu, work: Path, pid: int) -> Criu:
    """This criu, except that a dump of the tree rooted at `pid` fails the way criu reports a failure."""
    wrapper = work / "criu-failing.py"
    wrapper.write_text(
        "import os, sys\n"
        f"if '-t' in sys.argv and sys.argv[sys.argv.index('-t') + 1] == '{pid}':\n"
        "    print('Error (criu/cr-dump.c:1): injected failure', file=sys.stderr)\n"
        "    sys.exit(1)\n"
        f"os.execv({criu.argv[0]!r}, [{criu.argv[0]!r}, *{list(criu.argv[1:])!r}, *sys.argv[1:]])\n"
    )
    return Criu((sys.executable, str(wrapper)), "test wrapper", criu.version)


def test_failed_dump_puts_back_the_trees_dumped_before_it(criu: Criu, ns: NetNS, work: Path) -> None:
    """The second tree cannot be dumped (criu fails, and leaves it running): the first one is restored and the
    lock released, so the two go on talking."""
    server = Program(ns, work, "server", "server", "7022")
    client = Program(ns, work, "client", "client", "7022")
    with programs(server, client):
        client.wait_output(lambda lines: len(lines) >= 3)
        with pytest.raises(CriuError) as failed:
            driver.dump([server.pid, client.pid], work / "img", criu=failing_for(criu, work, client.pid))
        message = str(failed.value)
        assert "injected failure" in message
        assert f"Nothing was moved: the tree(s) dumped before it ({server.pid}) were restored" in message
        assert locks_in(ns) == []
        assert not (work / "img" / "sockrepair-criu.json").exists()
        count = len(client.lines())
        lines = client.wait_output(lambda lines: len(lines) >= count + 10 or not counting(lines))
    assert counting(lines) and len(lines) >= count + 10


def test_restore_refuses_while_a_dumped_pid_is_a_zombie(
    criu: Criu, ns: NetNS, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root's parent (here: a shell-like middleman that never waits) keeps the pid: explained before criu runs."""
    ready = work / "pid"
    with ns.entered():
        parent = subprocess.Popen(
            [sys.executable, "-c", "import os, signal, subprocess, sys\n"
             f"p = subprocess.Popen([sys.executable, {str(HOLDER)!r}, 'pairs', {str(ready)!r}, '1', '127.0.0.1', '10'],"
             " start_new_session=True)\nsignal.pause()"],
            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        root = int(ready.read_text().split()[0])
        monkeypatch.setattr(reap, "REAP_TIMEOUT", 1.0)
        report = driver.dump([root], work / "img", criu=criu)
        assert len(report.warnings) == 1 and "zombie" in report.warnings[0] and str(parent.pid) in report.warnings[0]
        with ns.entered(), pytest.raises(CriuError, match="zombie.*Can't fork for PID: File exists"):
            driver.restore(work / "img", criu=criu)
        assert len(locks_in(ns)) == 2, "a refused restore leaves the lock in place"
    finally:
        parent.kill()
        parent.wait()
