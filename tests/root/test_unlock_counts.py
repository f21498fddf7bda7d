"""`sockrepair unlock TUPLE...` says how many connections it unlocked, counted from what was locked: a tuple that is
not locked (the kernel skips it silently), or the other direction of a locked one (as the peer's side writes it,
another key), is named as not locked; the lock on the connection stays."""

from __future__ import annotations

import argparse
import socket

import pytest

from sockrepair.cli.lock import add_lock_commands
from sockrepair.lock import api as lockmod
from sockrepair.netns import NetNS
from sockrepair.state import ConnTuple

pytestmark = pytest.mark.root

T4 = ConnTuple(socket.AF_INET, "10.0.0.1", 1000, "10.0.0.2", 2000)
MAPPED = ConnTuple(socket.AF_INET6, "::ffff:10.0.0.3", 3000, "::ffff:10.0.0.4", 4000)
NEVER = ConnTuple(socket.AF_INET, "10.0.0.5", 5000, "10.0.0.6", 6000)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sockrepair")
    add_lock_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_unlock_counts_only_what_was_locked_and_names_the_other_direction(capsys: pytest.CaptureFixture[str]) -> None:
    with NetNS() as ns:
        try:
            assert _cli("lock", "--netns", ns.name, "--ttl", "30", str(T4), str(MAPPED)) == 0
            capsys.readouterr()
            assert _cli("unlock", "--netns", ns.name, str(T4.reversed()), str(NEVER)) == 0
            assert capsys.readouterr().out.splitlines() == [
                "unlocked 0 connection(s)",
                f"  {T4.reversed()}  was not locked: its other direction is, `sockrepair unlock {T4}`",
                f"  {NEVER}  was not locked",
            ]
            assert sorted(str(r.tuple) for r in lockmod.list_locks(netns=ns.name)) == sorted(
                [str(T4), str(MAPPED.wire())])
            assert _cli("unlock", "--netns", ns.name, str(T4), str(T4), str(MAPPED)) == 0
            assert capsys.readouterr().out.splitlines() == ["unlocked 2 connection(s)"]
            assert lockmod.list_locks(netns=ns.name) == []
        finally:
            lockmod.unlock_all(netns=ns.name)
            lockmod.close_cached_lockers()
