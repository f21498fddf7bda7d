"""migrate(journal=...) that names no usable directory is refused before anything is frozen, with the path and the
reason (it was a bare NotADirectoryError from inside the freeze); the program goes on with its connection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import sockrepair
from sockrepair.netns import NetNS
from tests.root.programs import echo_connection
from tests.root.streams import recv_exactly


def _bad(tmp_path: Path, which: str) -> Path:
    if which == "file":
        (tmp_path / "file").write_bytes(b"")
        return tmp_path / "file"
    if which == "under-a-file":
        (tmp_path / "file").write_bytes(b"")
        return tmp_path / "file" / "journal"
    if which == "others-write":
        (tmp_path / "open").mkdir()
        os.chmod(tmp_path / "open", 0o777)
        return tmp_path / "open"
    if which == "under-others-write":
        (tmp_path / "open").mkdir()
        os.chmod(tmp_path / "open", 0o777)
        return tmp_path / "open" / "journal"
    os.symlink(tmp_path, tmp_path / "link")
    return tmp_path / "link"


@pytest.mark.parametrize(("which", "why"), [("file", "not a directory"), ("under-a-file", "not a directory"),
                                            ("others-write", "writable by group and others"),
                                            ("under-others-write", "writable by others"),
                                            ("symlink", "is a symlink")])
def test_a_journal_that_is_no_private_directory_is_refused_before_the_freeze(
        netns: NetNS, tmp_path: Path, which: str, why: str) -> None:
    bad = _bad(tmp_path, which)
    with echo_connection(netns) as (proc, client):
        with pytest.raises(sockrepair.ImageError, match=why) as caught:
            sockrepair.migrate(proc.pid, journal=bad, handoff=lambda socks, tuples: None)
        assert caught.value.path == str(bad) and str(bad) in str(caught.value)
        # nothing was frozen, locked or ended: the program answers on the same connection
        assert sockrepair.list_locks() == []
        assert proc.poll() is None
        client.sendall(b"after")
        assert recv_exactly(client, 5) == b"after"
    assert not (tmp_path / "journal.img").exists()
    if which == "under-others-write":
        assert not bad.exists()  # nothing made under the refused parent


def test_an_empty_journal_path_is_refused() -> None:
    from sockrepair.move.journal import given_directory

    with pytest.raises(sockrepair.ImageError, match="empty path"):
        given_directory("")


def test_a_missing_journal_directory_is_made_private(tmp_path: Path) -> None:
    from sockrepair.move.journal import given_directory

    made = given_directory(tmp_path / "a" / "b")
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
