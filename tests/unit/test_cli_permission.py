"""A permission error from the kernel tells a user who is not root what sockrepair needs (the CLI's one line)."""

from __future__ import annotations

import errno

import pytest

from sockrepair.cli import output


@pytest.mark.parametrize(("uid", "hinted"), [(1000, True), (0, False)])
def test_eacces_says_root_is_needed_only_to_others(monkeypatch: pytest.MonkeyPatch, uid: int, hinted: bool) -> None:
    monkeypatch.setattr(output.os, "geteuid", lambda: uid)
    text = output.message(PermissionError(errno.EACCES, "Permission denied", "/proc/1/ns/net"))
    assert text.startswith("/proc/1/ns/net: Permission denied")
    assert ("needs root" in text) is hinted
    # an error that is not about permission gets no hint
    assert "needs root" not in output.message(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"))
