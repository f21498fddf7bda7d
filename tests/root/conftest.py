"""Fixtures for root tests: each test runs in a fresh network namespace, deleted afterwards even on failure."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sockrepair.criu.locate import Criu, find_criu
from sockrepair.errors import CriuError
from sockrepair.lock import Locker
from sockrepair.move.procfs import stat
from sockrepair.netns import NetNS


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/root/" in item.nodeid or item.nodeid.startswith("root/"):
            item.add_marker(pytest.mark.root)


@pytest.fixture
def netns() -> Iterator[NetNS]:
    with NetNS() as ns, ns.entered():
        yield ns


@pytest.fixture(scope="module")
def criu() -> Criu:
    """The criu `find_criu` picks (`sockrepair criu setup`, which scripts/setup.sh runs, installs one); tests that
    need it skip only when none is found."""
    if os.geteuid() != 0:
        pytest.skip("criu needs root")
    try:
        found = find_criu()
    except CriuError as exc:
        pytest.skip(f"criu is not set up: {exc}")
    return found.require_working()


@pytest.fixture
def ns() -> Iterator[NetNS]:
    """A namespace the test joins only where it says so (criu must not run under `ip netns exec`)."""
    with NetNS() as made:
        yield made


@pytest.fixture
def two_hosts() -> Iterator[tuple[NetNS, NetNS]]:
    """Namespaces `a` (server) and `b` (client) joined by a veth pair (a device with checksum offload):
    10.77.0.1/fd77::1 and 10.77.0.2/fd77::2."""
    with NetNS() as a, NetNS() as b:
        a.ip("link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b.name)
        for ns, dev, last in ((a, "va", 1), (b, "vb", 2)):
            ns.ip("addr", "add", f"10.77.0.{last}/24", "dev", dev)
            ns.ip("addr", "add", f"fd77::{last}/64", "dev", dev, "nodad")
            ns.ip("link", "set", dev, "up")
        yield a, b


def end_keepers(root: Path) -> None:
    """SIGKILL the keepers (sockrepair.move.keepd) of the image directories under `root` that still run: a test that
    dumps and never restores would leave one until its lock's ttl, holding the namespace the test deleted."""
    for record in root.rglob("keeper.json"):
        info = json.loads(record.read_text())
        try:
            pidfd = os.pidfd_open(info["pid"])
        except ProcessLookupError:
            continue
        try:
            proc = stat(info["pid"])
            if proc is not None and proc.starttime == info["start_time"]:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)


@pytest.fixture(autouse=True)
def _no_keeper_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None:
        end_keepers(tmp)


@pytest.fixture
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sockrepair-criu-") as d:
        try:
            yield Path(d)
        finally:
            end_keepers(Path(d))


@pytest.fixture
def locker(netns: NetNS) -> Iterator[Locker]:
    """A Locker in the test's namespace; afterwards nothing of the lock may remain there."""
    with Locker(label="pytest") as lk:
        yield lk
        leftover = lk.list_locks()
        lk.unlock_all()
        assert leftover == []
        assert lk.rule_count() == 0


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


_OWNER = re.compile(r"^(?:sockrepair-|srlab)(\d+)")


def leaked_namespaces(before: set[str]) -> set[str]:
    """Namespaces made since `before` whose creating process is gone: what a finished run left behind. Those of a
    process still running (another test run on the machine) are not this test's to judge."""
    leaked = set()
    for name in namespaces() - before:
        owner = _OWNER.match(name)
        if owner is None or not os.path.exists(f"/proc/{owner.group(1)}"):
            leaked.add(name)
    return leaked


Pair = tuple[socket.socket, socket.socket]


def _make_pair(family: int, addr: str, server_rcvbuf: int | None = None, client_rcvbuf: int | None = None,
               server_sndbuf: int | None = None) -> Pair:
    """An established (client, server) pair on loopback; buffer sizes are set before the handshake so the
    negotiated window scale matches them."""
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if server_rcvbuf:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, server_rcvbuf)
        if server_sndbuf:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
        listener.bind((addr, 0))
        listener.listen(1)
        client = socket.socket(family, socket.SOCK_STREAM)
        if client_rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        client.connect(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


@pytest.fixture
def make_pair(netns: NetNS) -> Iterator[Callable[..., Pair]]:
    made: list[socket.socket] = []

    def factory(family: int = socket.AF_INET, addr: str = "127.0.0.1", **bufs: int) -> Pair:
        pair = _make_pair(family, addr, **bufs)
        made.extend(pair)
        return pair

    yield factory
    for s in made:
        s.close()
