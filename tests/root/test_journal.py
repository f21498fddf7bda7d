"""A move that cannot lose a connection: the journal migrate() writes before it ends the source, restores of stale
images refused, and a handoff target checked before anything is restored."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sockrepair
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.move.dump import After, dump
from sockrepair.move.journal import stale_reason
from sockrepair.move.procfs import stat
from tests.root.streams import echo_clients, echo_round


def restore_cli(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "restore", "-D", str(directory), *extra],
                          capture_output=True, text=True, timeout=60)


def restore_into_echo(directory: Path) -> subprocess.Popen[bytes]:
    """`sockrepair restore -D directory --exec` the echo program; returns once it serves the connections."""
    proc = subprocess.Popen([sys.executable, "-m", "sockrepair.cli.main", "restore", "-D", str(directory), "--exec",
                             sys.executable, str(ECHO_SERVER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"ready"):
        proc.wait(10)
        assert proc.stderr is not None
        raise AssertionError(f"restore failed: {proc.stderr.read().decode()}")
    return proc


def _gone(pid: int) -> bool:
    st = stat(pid)
    return st is None or st.zombie


def test_a_network_step_that_fails_leaves_a_journal_that_restore_completes(netns, tmp_path):
    with echo_clients(3, 20_000) as (server, clients, offsets, stop_later):
        journal: Path | None = None
        try:
            def network() -> None:
                raise RuntimeError("the address could not be moved")

            with pytest.raises(RuntimeError, match="could not be moved") as caught:
                sockrepair.migrate(server.pid, network=network, keep=False)
            journal = Path(caught.value.journal)  # type: ignore[attr-defined]
            assert any("sockrepair restore -D" in n for n in caught.value.__notes__)
            assert server.wait(5) == -signal.SIGKILL
            assert os.stat(journal).st_mode & 0o777 == 0o700
            assert os.stat(journal / "journal.img").st_mode & 0o777 == 0o600
            assert os.stat(journal / "journal.json").st_mode & 0o777 == 0o600
            assert stale_reason(journal) is None
            stop_later(restore_into_echo(journal))
            echo_round(clients, offsets, 100_000)
            assert sockrepair.list_locks() == []
            # restored once: a second restore is refused
            again = restore_cli(journal, "--unix", str(tmp_path / "x.sock"))
            assert again.returncode == 1 and "this move completed" in again.stderr
        finally:
            if journal is not None:
                shutil.rmtree(journal, ignore_errors=True)


def test_a_failure_before_the_kill_leaves_the_program_serving_and_no_journal(netns, tmp_path):
    with echo_clients(2, 10_000) as (server, clients, offsets, _):
        # the program has no connection on fd 999: refused before anything is frozen
        with pytest.raises(sockrepair.ProcessError):
            sockrepair.migrate(server.pid, wanted=[999], journal=tmp_path / "j", keep=False)
        assert not (tmp_path / "j" / "journal.json").exists()
        echo_round(clients, offsets, 10_000)
        assert sockrepair.list_locks() == []


def test_a_handoff_target_that_cannot_work_costs_nothing(netns, tmp_path):
    with echo_clients(2, 10_000) as (server, clients, offsets, stop_later):
        dump(server.pid, tmp_path / "img", after=After.KILL)
        server.wait(5)
        missing = restore_cli(tmp_path / "img", "--unix", str(tmp_path / "no-such.sock"))
        assert missing.returncode == 1 and "cannot pass the connections" in missing.stderr, missing.stderr
        text = tmp_path / "not-a-program"
        text.write_text("just words\n")
        text.chmod(0o755)
        cannot_run = restore_cli(tmp_path / "img", "--exec", str(text))
        assert cannot_run.returncode == 1 and "the kernel cannot run it" in cannot_run.stderr, cannot_run.stderr
        # nothing was restored nor unlocked: the connections are still there to be restored
        assert len(sockrepair.list_locks()) == 2
        stop_later(restore_into_echo(tmp_path / "img"))
        echo_round(clients, offsets, 50_000)


def test_stale_images_are_refused_with_the_reason(netns, tmp_path):
    with echo_clients(1, 1000) as (server, clients, offsets, _):
        dump(server.pid, tmp_path / "running", after=After.LEAVE_RUNNING)
        echo_round(clients, offsets, 1000)
        refused = restore_cli(tmp_path / "running", "--unix", str(tmp_path / "x.sock"))
        assert refused.returncode == 1, refused.stderr
        assert "stale" in refused.stderr and "still running" in refused.stderr and "--force" in refused.stderr
        dump(server.pid, tmp_path / "killed", after=After.KILL, ttl=30)
        assert server.wait(5) == -signal.SIGKILL
        assert stale_reason(tmp_path / "killed") is None
        why = stale_reason(tmp_path / "killed", now=time.time() + 31)
        assert why is not None and "lock expired" in why
        sockrepair.unlock_all()


def test_an_exec_that_fails_after_the_restore_puts_the_connections_back(netns, tmp_path):
    """A file that looks runnable (ELF magic) but is not: the restore is done and the exec fails, so the connections
    are locked again and their sockets closed silently; a second restore with a real program serves them."""
    with echo_clients(2, 10_000) as (server, clients, offsets, stop_later):
        dump(server.pid, tmp_path / "img", after=After.KILL)
        server.wait(5)
        fake = tmp_path / "fake-elf"
        fake.write_bytes(b"\x7fELF" + b"\0" * 60)
        fake.chmod(0o755)
        failed = restore_cli(tmp_path / "img", "--exec", str(fake))
        assert failed.returncode == 1 and "cannot run" in failed.stderr, failed.stderr
        assert "locked again" in failed.stderr and "restore again" in failed.stderr
        assert len(sockrepair.list_locks()) == 2
        assert stale_reason(tmp_path / "img") is None
        stop_later(restore_into_echo(tmp_path / "img"))
        echo_round(clients, offsets, 50_000)
        assert sockrepair.list_locks() == []
