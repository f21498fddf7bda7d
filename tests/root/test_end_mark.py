"""A mover whose mark of the point of no return fails (mark_ended: ENOSPC, EIO) after it told the guard: the source
is ended all the same, never left running with its sockets in repair mode and locked, and the note's command
(with --force: the images are unmarked) finishes the move. Before, the program ran on with every socket in repair
mode, locked, and `restore -D` refused its images as those of a running program."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys

import pytest

import sockrepair
from sockrepair.lab.subjects import start_receiver
from tests.root.streams import echo_clients, echo_round

FAILING_MARK = """
import errno, sys
from pathlib import Path
import sockrepair.move.{module} as mover
from sockrepair.move.handoff import send_over_unix

def mark_ended(directory, durable=None):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))

mover.mark_ended = mark_ended
pid, directory, unix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
{call}
"""
CALLS = {
    "migrate": "mover.migrate(pid, journal=directory, handoff=lambda socks, tuples: send_over_unix(unix, socks, tuples))",
    "dump": "mover.dump(pid, Path(directory))",
}


@pytest.mark.parametrize("module", ["migrate", "dump"])
def test_a_failed_mark_still_ends_the_source(netns, tmp_path, module):
    with echo_clients(3, 20_000) as (server, clients, offsets, stop_later):
        unix = tmp_path / "r.sock"
        receiver = stop_later(start_receiver(unix, max_seconds=120))
        directory = tmp_path / "moved"
        run = subprocess.run([sys.executable, "-c", FAILING_MARK.format(module=module, call=CALLS[module]),
                              str(server.pid), str(directory), str(unix)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and "No space left on device" in run.stderr, run.stderr
        assert server.wait(10) == -signal.SIGKILL
        hint = re.search(r"`(sockrepair restore -D [^`]*)`", run.stderr)
        assert hint is not None, run.stderr
        argv = [str(unix) if a == "PATH" else a for a in shlex.split(hint.group(1))]
        assert "--force" in argv
        done = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", *argv[1:]], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "restored 3 connection(s)" in done.stderr
        echo_round(clients, offsets, 30_000)
        assert receiver.poll() is None
        assert sockrepair.list_locks() == []
