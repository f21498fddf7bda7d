"""criu in a network namespace fresh from `ip netns add` (its loopback down, without an address) fails every
command; sockrepair names that cause and its fix, and `criu setup` does not fetch another criu for it (it used to
say "run `sockrepair criu setup`", which fetched one that failed the same way)."""

from __future__ import annotations

import os
import subprocess

import pytest

from sockrepair.criu import setup as criu_setup
from sockrepair.criu.locate import find_criu
from sockrepair.errors import CriuError
from sockrepair.netns import named


def test_a_fresh_namespace_with_lo_down_is_named_with_its_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    criu = find_criu()
    name = f"srlo{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    fetched: list[str] = []
    try:
        with named(name):
            result = criu.check()
            monkeypatch.setattr(criu_setup, "fetch", lambda *args: fetched.append("fetch"))
            with pytest.raises(CriuError, match="loopback interface of its network namespace is down") as caught:
                criu_setup.setup()
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        with named(name):
            up = criu.check()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert not result.ok
    assert result.report.keys == ["loopback-down"]
    assert "link set lo up" in result.fix
    assert "link set lo up" in str(caught.value)
    assert fetched == []
    assert up.ok, up.reason  # the cause named is the cause


def test_lo_set_down_after_it_was_up_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """lo set down with its address still on: criu's own test connect would wait out its SYN retries (about 2
    minutes, then "did not finish in 120 s", "run setup"); the check looks at lo first."""
    criu = find_criu()
    name = f"srlo{os.getpid()}b"
    ran: list[list[str]] = []
    real_run = type(criu).run
    monkeypatch.setattr(type(criu), "run", lambda self, argv, **kw: ran.append(argv) or real_run(self, argv, **kw))
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "down"], check=True)
        with named(name):
            result = criu.check()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert not result.ok and result.report.keys == ["loopback-down"]
    assert ran == []  # criu itself was not run
