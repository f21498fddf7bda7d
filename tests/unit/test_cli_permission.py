"""A permission error from the kernel tells a user who is not root what sockrepair needs (the CLI's one line)."""

from __future__ import annotations

import errno

import pytest

from sockrepair import netns
from sockrepair.cli import output
from sockrepair.errors import NetnsError


@pytest.mark.parametrize(("uid", "hinted"), [(1000, True), (0, False)])
def test_eacces_says_root_is_needed_only_to_others(monkeypatch: pytest.MonkeyPatch, uid: int, hinted: bool) -> None:
    monkeypatch.setattr(output.os, "geteuid", lambda: uid)
    text = output.message(PermissionError(errno.EACCES, "Permission denied", "/proc/1/ns/net"))
    assert text.startswith("/proc/1/ns/net: Permission denied")
    assert ("needs root" in text) is hinted
    # an error that is not about permission gets no hint
    assert "needs root" not in output.message(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"))


@pytest.mark.parametrize(("uid", "advice"), [(1000, "run as root"), (0, "refused to root too")])
def test_a_namespace_refused_to_root_does_not_tell_root_to_run_as_root(monkeypatch: pytest.MonkeyPatch, uid: int,
                                                                      advice: str) -> None:
    def refused(path: str, flags: int) -> int:
        if path == "/proc/1/ns/net":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags)

    real_open = netns.os.open
    monkeypatch.setattr(netns.os, "geteuid", lambda: uid)
    monkeypatch.setattr(netns.os, "open", refused)
    with pytest.raises(NetnsError) as caught, netns.inside("/proc/1/ns/net"):
        pass
    text = output.message(caught.value)
    assert text.startswith("not permitted to enter the network namespace at /proc/1/ns/net (") and advice in text
    assert ("run as root" in text) is (uid != 0)
