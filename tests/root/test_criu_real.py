"""The real criu on this kernel: `criu check`, each known failure produced for real and explained, and a real dump
decoded byte for byte. Everything runs in network namespaces the tests create (criu and the dumped trees join
only the namespace's network, never a new mount namespace) and is killed and deleted afterwards."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockrepair.criu.explain import Report, explain_dir, explain_text
from sockrepair.criu.images import load_connections
from sockrepair.criu.locate import Criu, find_criu
from sockrepair.errors import CriuError
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState

pytestmark = pytest.mark.root

HOLDER = Path(__file__).resolve().parent.parent / "data" / "criu" / "holder.py"
READY_WAIT = 20.0


class Tree:
    """holder.py started inside `ns` (network namespace only); killed and reaped on close if still ours."""

    def __init__(self, ns: NetNS, work: Path, name: str, *args: str) -> None:
        self.ready = work / f"{name}.ready"
        self.out = work / f"{name}.out"
        with ns.entered(), self.out.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HOLDER), args[0], str(self.ready), *args[1:]],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + READY_WAIT
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"holder {args} did not start: {self.out.read_text()}")
            time.sleep(0.02)
        self.pid = self.proc.pid
        self.extra = [int(word) for word in self.ready.read_text().split()[1:]]

    def reap(self) -> None:
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def trees(*made: Tree) -> Iterator[None]:
    try:
        yield
    finally:
        for tree in made:
            tree.close()


def run_criu(criu: Criu, ns: NetNS, *args: str) -> subprocess.CompletedProcess[str]:
    with ns.entered():
        return criu.run(list(args), timeout=120)


def dump(criu: Criu, ns: NetNS, tree: Tree, images: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Report]:
    images.mkdir()
    done = run_criu(criu, ns, "dump", "-t", str(tree.pid), "-D", str(images), "-o", "dump.log", *extra)
    return done, explain_dir(images, done.stderr)


def restore(criu: Criu, ns: NetNS, images: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Report]:
    done = run_criu(criu, ns, "restore", "-D", str(images), "-o", "restore.log", "-d", *extra)
    return done, explain_text((images / "restore.log").read_text() + done.stderr, "restore.log")


def problem_keys(report: Report) -> list[str]:
    return [f.known.key for f in report.problems]


def test_criu_check_passes_on_this_kernel() -> None:
    try:
        found = find_criu()
    except CriuError as exc:
        pytest.skip(f"criu is not set up: {exc}")
    result = found.check()
    assert result.ok, f"{found.path} ({found.version}): {result.reason}; fix: {result.fix}"


def test_dump_without_tcp_established_is_explained(criu: Criu, ns: NetNS, work: Path) -> None:
    tree = Tree(ns, work, "t", "pairs", "1", "127.0.0.1", "10")
    with trees(tree):
        done, report = dump(criu, ns, tree, work / "img")
        assert done.returncode != 0
        assert problem_keys(report) == ["tcp-established"]
        assert tree.proc.poll() is None, "a failed dump must leave the tree running"


def test_restore_over_an_unreaped_root_is_explained(criu: Criu, ns: NetNS, work: Path) -> None:
    tree = Tree(ns, work, "t", "pairs", "1", "127.0.0.1", "10")
    with trees(tree):
        done, report = dump(criu, ns, tree, work / "img", "--tcp-established")
        assert done.returncode == 0, report.text()
        # The dumped root is a zombie until its parent (this process) waits for it.
        done, report = restore(criu, ns, work / "img", "--tcp-established")
        assert done.returncode != 0
        assert problem_keys(report) == ["fork-exists"]
        tree.reap()
        done, report = restore(criu, ns, work / "img", "--tcp-established")
        assert done.returncode == 0 and problem_keys(report) == [], report.text()


def test_restore_without_the_local_address_is_explained(criu: Criu, ns: NetNS, work: Path) -> None:
    ns.ip("addr", "add", "192.0.2.7/32", "dev", "lo")
    tree = Tree(ns, work, "t", "pairs", "1", "192.0.2.7", "10")
    with trees(tree):
        done, report = dump(criu, ns, tree, work / "img", "--tcp-established")
        assert done.returncode == 0, report.text()
        tree.reap()
        ns.ip("addr", "del", "192.0.2.7/32", "dev", "lo")
        done, report = restore(criu, ns, work / "img", "--tcp-established")
        assert done.returncode != 0
        assert problem_keys(report) == ["bind-back"]


def wait_for_exit_line(tree: Tree, want: str) -> str:
    """The restored program is not our child: watch its output until it prints its last line or time runs out."""
    deadline = time.monotonic() + READY_WAIT
    while time.monotonic() < deadline:
        lines = tree.out.read_text().splitlines()
        if lines and lines[-1] == want:
            break
        time.sleep(0.05)
    return tree.out.read_text()


def test_seed_scenario_fails_with_criu_alone_and_is_explained(criu: Criu, ns: NetNS, work: Path) -> None:
    """The founding report, for real: separate trees, separate dumps, firewall wiped, restored one by one."""
    if shutil.which("iptables") is None:
        pytest.fail("criu's default network lock needs iptables: apt-get install iptables")
    server = Tree(ns, work, "server", "server", "7022")
    client = Tree(ns, work, "client", "client", "7022")
    with trees(server, client):
        for tree in (server, client):
            done, report = dump(criu, ns, tree, work / tree.out.stem, "--tcp-established")
            assert done.returncode == 0, report.text()
            tree.reap()
        counted = client.out.read_text().splitlines()
        assert counted and counted[-1].isdigit(), "the client echoed nothing before the dump"
        subprocess.run(ns.exec_argv(["iptables", "-F"]), check=True)
        restored = Report()
        for tree in (server, client):
            done, report = restore(criu, ns, work / tree.out.stem, "--tcp-established")
            assert done.returncode == 0, report.text()
            restored.extend(report)
        reset = "Can't read socket: Connection reset by peer"
        output = wait_for_exit_line(client, reset)
        restored.extend(explain_text(output, "client.out"))
        assert output.splitlines()[-1] == reset
        assert problem_keys(restored) == ["iptables-bad-rule", "iptables-config-failed", "connection-reset"]


def stream_from_images(sender: ConnectionState, receiver: ConnectionState) -> bytes:
    """One direction's bytes as the two images hold them: the receiver's unread queue, then what the sender still
    keeps. Bytes received but not yet acknowledged are in both; sequence numbers say how many overlap."""
    send_start = (sender.send_seq - len(sender.send_queue)) % 2**32
    overlap = (receiver.recv_seq - send_start) % 2**32
    assert overlap <= len(sender.send_queue), f"{sender.tuple}: a gap of {2**32 - overlap} bytes between the images"
    assert receiver.recv_queue[len(receiver.recv_queue) - overlap :] == sender.send_queue[:overlap]
    return receiver.recv_queue + sender.send_queue[overlap:]


def test_dump_and_restore_of_loopback_pairs_keeps_every_queued_byte(criu: Criu, ns: NetNS, work: Path) -> None:
    pairs, payload = 20, 5000
    tree = Tree(ns, work, "t", "pairs", str(pairs), "127.0.0.1", str(payload), "fill")
    (filled,) = tree.extra
    with trees(tree):
        done, report = dump(criu, ns, tree, work / "img", "--tcp-established")
        assert done.returncode == 0, report.text()
        tree.reap()
        states = load_connections(work / "img")
        assert len(states) == 2 * pairs
        by_tuple = {s.tuple: s for s in states}
        streams = sorted(stream_from_images(s, by_tuple[s.tuple.reversed()]) for s in states)
        client = [bytes((i + j) % 251 for j in range(payload)) for i in range(pairs)]
        server = [bytes((i + 7 * j + 3) % 253 for j in range(payload)) for i in range(pairs)]
        client[0] += bytes((13 * k + 5) % 251 for k in range(filled))
        assert streams == sorted(client + server)
        full = [s for s in states if s.send_queue]
        assert len(full) == 1 and full[0].unsent_len <= len(full[0].send_queue)
        done, report = restore(criu, ns, work / "img", "--tcp-established")
        assert done.returncode == 0 and problem_keys(report) == [], report.text()
        assert ns.pids() == [tree.pid]
