"""sockrepair.criu.explain on criu output recorded for real (tests/data/criu/README.md says how)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockrepair.criu.explain import CATALOGUE, criu_error, explain_dir, explain_text
from sockrepair.errors import CriuError

DATA = Path(__file__).resolve().parent.parent / "data" / "criu"


def explain_recorded(name: str):
    directory = DATA / name
    extra = "".join(p.read_text() for p in sorted(directory.glob("*.stderr")) + sorted(directory.glob("*.out")))
    report = explain_dir(directory, extra)
    for path in sorted(directory.glob("*.txt")):
        report.extend(explain_text(path.read_text(), path.name))
    return report


@pytest.mark.parametrize(
    ("name", "problems"),
    [
        ("tcp-established", ["tcp-established"]),
        ("so-passsec", ["so-passsec"]),
        ("vdso", ["vdso-bounds"]),
        ("fork-exists", ["fork-exists"]),
        ("bind-back", ["bind-back"]),
        ("iptables-flushed", ["iptables-bad-rule", "iptables-config-failed"]),
        ("seed-loopback", ["iptables-bad-rule", "iptables-config-failed", "connection-reset"]),
        ("seed-issue", ["iptables-bad-rule", "iptables-config-failed", "connection-reset"]),
        ("mount-ns", ["mount-sharing"]),
        ("fd-setsize", ["fd-setsize"]),
        ("fin-packet", ["fin-packet"]),
        ("loopback-down", ["loopback-down"]),
    ],
)
def test_recorded_failure_is_named_and_nothing_is_left_unexplained(name: str, problems: list[str]) -> None:
    report = explain_recorded(name)
    assert [f.known.key for f in report.problems] == problems
    assert report.unexplained == []


def test_every_catalogue_entry_is_documented() -> None:
    doc = (DATA.parent.parent.parent / "docs" / "criu-errors.md").read_text()
    for known in CATALOGUE:
        assert f"`{known.key}`" in doc, known.key


def test_repeated_lines_are_counted_once_with_where_first_seen() -> None:
    report = explain_recorded("iptables-flushed")
    bad_rule = next(f for f in report.findings if f.known.key == "iptables-bad-rule")
    assert bad_rule.count == 4
    assert bad_rule.source == "restore.log"
    assert bad_rule.line.startswith("iptables: Bad rule")


def test_harmless_errors_are_kept_apart() -> None:
    report = explain_recorded("tcp-established")
    assert "rlimit-nofile" in report.keys
    assert "RLIMIT_NOFILE" not in report.text()
    assert "RLIMIT_NOFILE" in report.text(harmless=True)


def test_unknown_error_lines_are_reported_not_dropped() -> None:
    log = "(00.1) Error (criu/foo.c:1): something new broke\n(00.2) Error (criu/cr-dump.c:1975): Dumping FAILED.\n"
    report = explain_text(log, "dump.log")
    assert report.findings == []
    assert [(u.line, u.lineno) for u in report.unexplained] == [("(00.1) Error (criu/foo.c:1): something new broke", 1)]
    err = criu_error("dump", report, "exit status 1")
    assert isinstance(err, CriuError)
    assert "something new broke" in str(err)


def test_error_message_carries_cause_and_fix() -> None:
    err = criu_error("restore", explain_recorded("fork-exists"), "exit status 1")
    text = str(err)
    assert text.startswith("criu restore failed: a process with a dumped pid still exists")
    assert "Fix: reap the dumped root" in text


def test_report_text_and_dict_agree() -> None:
    report = explain_recorded("bind-back")
    as_dict = report.to_dict()
    assert [f["key"] for f in as_dict["findings"]] == report.keys
    assert "ip addr add" in report.text()
