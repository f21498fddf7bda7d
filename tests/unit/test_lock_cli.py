"""Argument parsing and output of the lock subcommands (no kernel involved)."""

from __future__ import annotations

import argparse
import socket

import pytest

from sockrepair.cli.lock import _format, add_lock_commands, cmd_unlock
from sockrepair.errors import LockError
from sockrepair.lock.locker import DEFAULT_TTL, LockRecord
from sockrepair.state import ConnTuple


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sockrepair")
    add_lock_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_lock_parses_tuples_ttl_label_and_netns() -> None:
    args = parse("lock", "127.0.0.1:5000->127.0.0.1:6000", "[::1]:1->[::1]:2", "--ttl", "2.5", "--netns", "ns1")
    assert args.tuples == [
        ConnTuple(socket.AF_INET, "127.0.0.1", 5000, "127.0.0.1", 6000),
        ConnTuple(socket.AF_INET6, "::1", 1, "::1", 2),
    ]
    assert (args.ttl, args.netns, args.label) == (2.5, "ns1", None)
    assert parse("lock", "1.2.3.4:1->1.2.3.5:2").ttl == DEFAULT_TTL


@pytest.mark.parametrize(
    "argv",
    [
        ("lock",),
        ("lock", "1.2.3.4:1-1.2.3.5:2"),
        ("lock", "1.2.3.4:1->1.2.3.5:2", "--ttl", "0"),
        ("lock", "1.2.3.4:1->1.2.3.5:2", "--ttl", "soon"),
        ("unlock", "[::1]:0->[::1]:2"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [("unlock",), ("unlock", "--all", "1.2.3.4:1->1.2.3.5:2")])
def test_unlock_wants_tuples_or_all(argv: tuple[str, ...]) -> None:
    with pytest.raises(LockError, match="TUPLE... or --all"):
        cmd_unlock(parse(*argv))


def test_each_command_has_a_handler() -> None:
    assert parse("locks", "--json").func.__name__ == "cmd_locks"
    assert parse("unlock", "--all").func.__name__ == "cmd_unlock"


def test_table_output() -> None:
    assert _format([]) == "no locked connections"
    rec = LockRecord(ConnTuple(socket.AF_INET, "10.0.0.1", 1, "10.0.0.2", 2), 9.04, 60.0, "me pid=3 host=h")
    lines = _format([rec]).splitlines()
    assert lines[0].split() == ["CONNECTION", "LEFT", "TTL", "KEPT", "OWNER"]
    assert lines[1].split() == ["10.0.0.1:1->10.0.0.2:2", "9.0s", "60s", "-", "me", "pid=3", "host=h"]
    kept = LockRecord(ConnTuple(socket.AF_INET, "10.0.0.1", 1, "10.0.0.2", 2), 9.04, 60.0, "me pid=3 host=h", 49429)
    assert _format([kept]).splitlines()[1].split()[3] == "49429"
