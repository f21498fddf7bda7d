"""A journal says which network namespace its connections were in, by name when it has one and always by inode: a
restore run from elsewhere goes there, or is refused, instead of rebuilding the connections where their peers
never reach them (the break-it pass: a mover run under `ip netns exec` left a journal whose restore, run from the
host's namespace, rebuilt every connection there, and every one was reset)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sockrepair
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.netns import NetNS, inside
from tests.root.streams import echo_clients, echo_round

# the namespace this process started in (the host's), held open: the tests themselves run inside their own
_HOST_FD = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
HOST = f"/proc/self/fd/{_HOST_FD}"


@contextlib.contextmanager
def _journal_of_a_failed_move(server_pid: int) -> Iterator[tuple[Path, list[subprocess.Popen[bytes]]]]:
    """The journal a move of `server_pid` leaves when its network step fails (the source ended, the connections
    locked), and a list for the restores the test starts: each is killed, and the journal removed, afterwards."""
    def network() -> None:
        raise RuntimeError("the address could not be moved")

    with pytest.raises(RuntimeError, match="could not be moved") as caught:
        sockrepair.migrate(server_pid, network=network, keep=False)
    journal = Path(caught.value.journal)  # type: ignore[attr-defined]
    restores: list[subprocess.Popen[bytes]] = []
    try:
        yield journal, restores
    finally:
        for restored in restores:
            restored.send_signal(signal.SIGKILL)
            restored.wait()
        shutil.rmtree(journal, ignore_errors=True)


def _restore_from(where: str, journal: Path, restores: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """`sockrepair restore -D journal --exec` the echo program, started in the namespace at `where`; returns once the
    program serves the connections."""
    with inside(where):
        restored = subprocess.Popen([sys.executable, "-m", "sockrepair.cli.main", "restore", "-D", str(journal),
                                     "--exec", sys.executable, str(ECHO_SERVER)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    restores.append(restored)
    assert restored.stdout is not None
    assert restored.stdout.readline().startswith(b"ready")
    return restored


def test_a_journal_names_its_namespace_and_a_restore_from_the_host_goes_there(netns: NetNS) -> None:
    with echo_clients(3, 20_000) as (server, clients, offsets, _), \
            _journal_of_a_failed_move(server.pid) as (journal, restores):
        source = json.loads((journal / "journal.json").read_text())["source"]
        assert source["netns"] == netns.name
        assert source["netns_inode"] == os.stat(netns.path).st_ino
        restored = _restore_from(HOST, journal, restores)
        # the program runs where the connections were
        assert os.stat(f"/proc/{restored.pid}/ns/net").st_ino == os.stat(netns.path).st_ino
        echo_round(clients, offsets, 20_000)


def test_a_restore_outside_a_nameless_namespace_is_refused(netns: NetNS) -> None:
    with echo_clients(3, 20_000) as (server, clients, offsets, _), \
            _journal_of_a_failed_move(server.pid) as (journal, restores):
        # what a mover in a namespace without a name (unshare, a container's) records
        index = json.loads((journal / "journal.json").read_text())
        index["source"]["netns"] = None
        (journal / "journal.json").write_text(json.dumps(index))
        with inside(HOST):
            refused = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "restore", "-D", str(journal),
                                      "--exec", "true"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert "taken in network namespace" in refused.stderr and "nsenter" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        # nothing was restored or unlocked: inside the namespace the same journal restores every connection
        _restore_from(netns.path, journal, restores)
        echo_round(clients, offsets, 20_000)
