"""`sockrepair restore -D` of a journal root wrote (0700), run by another user: one line that says root is needed
(before, "DIR: Permission denied" alone, which the user could take for a damaged journal)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tests.clihelp import run_main

NOBODY = 65534


def test_restore_of_roots_journal_by_another_user_says_run_as_root() -> None:
    top = Path(tempfile.mkdtemp(prefix="sockrepair-nonroot-"))
    try:
        os.chmod(top, 0o755)
        journal = top / "move-1-abcdefgh"
        journal.mkdir(mode=0o700)
        (journal / "journal.json").write_text("{}")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 100
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                code, _, err = run_main("restore", "-D", str(journal), "--unix", str(top / "x"))
                os.write(write, err.encode())
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            err = f.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1, err
        assert err == f"sockrepair: error: {journal}: Permission denied (a journal root wrote: run as root)\n"
        assert sorted(os.listdir(top)) == [journal.name]
    finally:
        shutil.rmtree(top)
