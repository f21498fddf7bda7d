"""`restore --unix ""` is a usage error like `-D ""`: before, it went on to read the images and then said "refused
to pass connections over : it is not a UNIX socket" (exit 1)."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_cli import usage_error


def test_an_empty_unix_path_is_a_usage_error(tmp_path: Path) -> None:
    err = usage_error("restore", "-D", str(tmp_path), "--unix", "")
    assert err == "sockrepair restore: error: argument --unix: an empty path names no file\n"
