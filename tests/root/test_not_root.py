"""Commands run by a user who is not root say in one line that root is needed, and create nothing: `restore -D` of a
journal root wrote (0700; before, "DIR: Permission denied" alone, which the user could take for a damaged journal),
`dump` of the user's own program (before, "setns(...): Operation not permitted" alone)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.clihelp import run_main

NOBODY = 65534


def _as_nobody(*argv: str) -> tuple[int, str]:
    """(exit status, stderr) of `sockrepair ARGV...` run in a child as nobody."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code, _, err = run_main(*argv)
            os.write(write, err.encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        err = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_restore_of_roots_journal_by_another_user_says_run_as_root() -> None:
    top = Path(tempfile.mkdtemp(prefix="sockrepair-nonroot-"))
    try:
        os.chmod(top, 0o755)
        journal = top / "move-1-abcdefgh"
        journal.mkdir(mode=0o700)
        (journal / "journal.json").write_text("{}")
        code, err = _as_nobody("restore", "-D", str(journal), "--unix", str(top / "x"))
        assert code == 1, err
        assert err == f"sockrepair: error: {journal}: Permission denied (a journal root wrote: run as root)\n"
        assert sorted(os.listdir(top)) == [journal.name]
    finally:
        shutil.rmtree(top)


def test_dump_of_ones_own_program_says_run_as_root() -> None:
    top = Path(tempfile.mkdtemp(prefix="sockrepair-nonroot-"))
    program = subprocess.Popen(["sleep", "60"], user=NOBODY, group=NOBODY, extra_groups=[])
    try:
        os.chmod(top, 0o777)
        code, err = _as_nobody("dump", "--pid", str(program.pid), "-D", str(top / "d"))
        assert code == 1, err
        assert err == (f"sockrepair: error: setns(/proc/{program.pid}/ns/net): Operation not permitted (run as root: "
                       "setns needs CAP_SYS_ADMIN, and sockrepair CAP_NET_ADMIN there)\n")
        assert os.listdir(top) == [] and program.poll() is None
    finally:
        program.kill()
        program.wait()
        shutil.rmtree(top)
