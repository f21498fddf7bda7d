"""The lock's bookkeeping in the kernel: renewal, idempotent unlock, expiry, crashed and concurrent lockers, named
namespaces, the module API and the CLI commands. Every test leaves no element and no table behind."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from sockrepair.cli.lock import add_lock_commands
from sockrepair.errors import LockError
from sockrepair.lock import Locker, nfconst, nft_status
from sockrepair.lock import api as lockmod
from sockrepair.netns import NetNS
from sockrepair.state import ConnTuple

pytestmark = pytest.mark.root

T4 = ConnTuple(socket.AF_INET, "10.0.0.1", 1000, "10.0.0.2", 2000)
T6 = ConnTuple(socket.AF_INET6, "fd00::1", 1000, "fd00::2", 2000)
MAPPED = ConnTuple(socket.AF_INET6, "::ffff:10.0.0.3", 3000, "::ffff:10.0.0.4", 4000)


def wait_for(cond: Callable[[], bool], what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def many(count: int, family: int = socket.AF_INET) -> list[ConnTuple]:
    if family == socket.AF_INET:
        return [
            ConnTuple(family, f"10.1.{i // 250}.{i % 250 + 1}", 1024 + i % 60000, "10.2.0.1", 443) for i in range(count)
        ]
    return [ConnTuple(family, f"fd01::{i + 1:x}", 1024 + i % 60000, "fd02::1", 443) for i in range(count)]


def test_lock_lists_all_families_with_owner_and_time(locker: Locker) -> None:
    assert locker.lock([T4, T6, MAPPED], ttl=30) == 3
    records = {r.tuple: r for r in locker.list_locks()}
    assert set(records) == {T4, T6, MAPPED.wire()}
    for rec in records.values():
        assert rec.ttl == 30.0
        assert 0 < rec.seconds_left <= 30.0
        assert rec.owner.startswith("pytest pid=")
    assert locker.rule_count() == 15
    locker.unlock([T4, T6, MAPPED])


def test_lock_twice_renews_and_unlock_is_idempotent(locker: Locker) -> None:
    locker.unlock([T4])  # nothing locked, no table yet: not an error, and nothing is created
    assert locker.rule_count() == 0
    locker.lock([T4], ttl=5)
    wait_for(lambda: locker.list_locks()[0].seconds_left <= 4.5, "time to pass")
    locker.lock([T4, T4], ttl=5)
    [rec] = locker.list_locks()
    assert rec.seconds_left > 4.5 and rec.tuple == T4
    locker.unlock([T4])
    locker.unlock([T4])
    locker.unlock([T6, ConnTuple(socket.AF_INET, "10.9.9.9", 9, "10.9.9.8", 8)])
    assert locker.list_locks() == []
    assert locker.rule_count() == 15


def test_unlock_without_destroy_messages_skips_missing(locker: Locker) -> None:
    """The path for kernels before 6.3, which have no DESTROYSETELEM: delete only what is there."""
    locker.lock([T4, T6, MAPPED], ttl=30)
    locker._destroy = False
    locker.unlock([T4, T6, ConnTuple(socket.AF_INET, "10.9.9.9", 9, "10.9.9.8", 8)])
    assert [r.tuple for r in locker.list_locks()] == [MAPPED.wire()]
    locker.unlock([MAPPED])
    locker.unlock([MAPPED])


def test_elements_expire(locker: Locker) -> None:
    locker.lock([T4, T6], ttl=1)
    assert len(locker.list_locks()) == 2
    wait_for(lambda: locker.list_locks() == [], "the elements to expire")


def test_locked_context_manager_releases_on_error(locker: Locker) -> None:
    with pytest.raises(RuntimeError), locker.locked([T4], ttl=30) as tuples:
        assert tuples == [T4]
        assert [r.tuple for r in locker.list_locks()] == [T4]
        raise RuntimeError("migration failed")
    assert locker.list_locks() == []


def test_ten_thousand_in_one_transaction(locker: Locker) -> None:
    conns = many(7000) + many(3000, socket.AF_INET6)
    assert locker.lock(conns, ttl=30) == 10000
    assert len(locker.list_locks()) == 10000
    locker.unlock(conns[::2])
    assert {r.tuple for r in locker.list_locks()} == set(conns[1::2])
    locker.unlock(conns)
    assert locker.list_locks() == []


def test_table_removed_behind_our_back_is_rebuilt(locker: Locker) -> None:
    locker.lock([T4], ttl=30)
    with Locker() as other:
        other.unlock_all()
    locker.lock([T6], ttl=30)
    assert [r.tuple for r in locker.list_locks()] == [T6]
    assert locker.rule_count() == 15
    locker.unlock([T6])


def test_bad_input_is_a_lock_error(locker: Locker) -> None:
    for ttl in (0, -1, float("nan"), float("inf"), 1e9):
        with pytest.raises(LockError, match="ttl"):
            locker.lock([T4], ttl=ttl)
    with pytest.raises(LockError, match="ConnTuple"):
        locker.lock(["10.0.0.1:1->10.0.0.2:2"])  # type: ignore[list-item]
    assert locker.rule_count() == 0


def _child(ns: NetNS, code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ns.exec_argv([sys.executable, "-c", code]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_kill9_leaves_only_an_expiring_element() -> None:
    with NetNS() as ns:
        child = _child(
            ns,
            "import socket, time; from sockrepair.lock import api as L\n"
            "from sockrepair.state import ConnTuple\n"
            "L.lock([ConnTuple(socket.AF_INET, '10.0.0.1', 1000, '10.0.0.2', 2000)], ttl=2)\n"
            "print('locked', flush=True)\n"
            "time.sleep(3600)\n",
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "locked\n"
            child.send_signal(signal.SIGKILL)
            child.wait()
            [rec] = lockmod.list_locks(netns=ns.name)
            assert rec.tuple == T4 and rec.seconds_left <= 2 and f"pid={child.pid} " in rec.owner
            wait_for(lambda: lockmod.list_locks(netns=ns.name) == [], "the orphaned element to expire")
        finally:
            child.kill()
            child.wait()
            lockmod.unlock_all(netns=ns.name)
            lockmod.close_cached_lockers()


def test_two_processes_lock_at_once() -> None:
    code = (
        "import socket, sys; from sockrepair.lock import api as L\n"
        "from sockrepair.state import ConnTuple\n"
        "base = int(sys.argv[1])\n"
        "v4 = [ConnTuple(socket.AF_INET, f'10.5.{base}.{i % 250 + 1}', 1024 + i, '10.6.0.1', 80) for i in range(300)]\n"
        "v6 = [ConnTuple(socket.AF_INET6, f'fd05::{base}:{i + 1:x}', 1024 + i, 'fd06::1', 80) for i in range(300)]\n"
        "sys.stdin.readline()\n"
        "L.lock(v4, ttl=60, group=49428)\n"
        "L.lock(v6, ttl=60, group=49428 + base)\n"
    )
    with NetNS() as ns:
        children = [
            subprocess.Popen(ns.exec_argv([sys.executable, "-c", code, str(n)]), stdin=subprocess.PIPE, text=True)
            for n in (1, 2)
        ]
        try:
            for child in children:  # both build the table from nothing at the same moment
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            assert [child.wait() for child in children] == [0, 0]
            records = lockmod.list_locks(netns=ns.name)
            owners = {r.owner.split()[1] for r in records}
            assert len(records) == 1200
            assert owners == {f"pid={child.pid}" for child in children}
            assert lockmod.default_locker(ns.name).rule_count() == 15
            # the keep chain both built at once, and one each: exactly one rule in each
            assert {r.group for r in records if r.tuple.family == socket.AF_INET} == {49428}
            assert {(r.owner.split()[1], r.group) for r in records if r.tuple.family == socket.AF_INET6} == {
                (f"pid={child.pid}", 49428 + n) for n, child in enumerate(children, 1)
            }
            text = subprocess.run(ns.exec_argv(["nft", "list", "table", "inet", "sockrepair"]), capture_output=True,
                                  text=True, check=True).stdout
            for group in (49428, 49429, 49430):
                assert text.count(f"log group {group} snaplen 65535 queue-threshold 1 drop") == 1
        finally:
            for child in children:
                child.kill()
                child.wait()
            lockmod.unlock_all(netns=ns.name)
            assert lockmod.list_locks(netns=ns.name) == []
            lockmod.close_cached_lockers()


def test_named_namespace_is_the_one_changed(netns: NetNS) -> None:
    with NetNS() as other:
        try:
            lockmod.lock([T4], ttl=30, netns=other.name)
            assert lockmod.list_locks() == []  # the calling thread's namespace is untouched
            assert [r.tuple for r in lockmod.list_locks(netns=other.name)] == [T4]
            with lockmod.locked([T6], ttl=30):
                assert [r.tuple for r in lockmod.list_locks()] == [T6]
            assert lockmod.list_locks() == []
            lockmod.unlock([T4], netns=other.name)
            assert lockmod.list_locks(netns=other.name) == []
        finally:
            lockmod.unlock_all(netns=other.name)
            lockmod.unlock_all()
            lockmod.close_cached_lockers()
    with pytest.raises(LockError, match="no network namespace named"):
        lockmod.lock([T4], netns="sockrepair-no-such-namespace")
    with pytest.raises(LockError, match="not a network namespace name"):
        lockmod.lock([T4], netns="../etc")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sockrepair")
    add_lock_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with NetNS() as ns:
        try:
            assert _cli("lock", "--netns", ns.name, "--ttl", "30", "--label", "cli-test", str(T4), str(T6)) == 0
            assert "locked 2 connection(s)" in capsys.readouterr().out
            assert _cli("locks", "--json", "--netns", ns.name) == 0
            listed = json.loads(capsys.readouterr().out)
            assert [(x["tuple"], x["owner"].split()[0]) for x in listed] == [
                (str(T4), "cli-test"),
                (str(T6), "cli-test"),
            ]
            assert _cli("unlock", "--netns", ns.name, str(T4), str(T4)) == 0
            assert _cli("locks", "--netns", ns.name) == 0
            out = capsys.readouterr().out
            assert str(T6) in out and str(T4) not in out
            with pytest.raises(LockError, match="TUPLE... or --all"):
                _cli("unlock", "--netns", ns.name)
            capsys.readouterr()
            # --all releases one owner's locks only (default label: sockrepair), listing them
            assert _cli("unlock", "--all", "--netns", ns.name) == 0
            out = capsys.readouterr().out
            assert out.startswith("unlocked 0 connection(s) of owner 'sockrepair'; 1 lock(s) of other owners kept")
            assert _cli("lock", "--netns", ns.name, "--ttl", "30", str(T4)) == 0
            assert _cli("unlock", "--all", "--owner", "cli-test", "--netns", ns.name) == 0
            out = capsys.readouterr().out
            assert "unlocked 1 connection(s) of owner 'cli-test'; 1 lock(s) of other owners kept" in out
            assert f"  {T6}  owner cli-test pid=" in out
            assert [str(r.tuple) for r in lockmod.list_locks(netns=ns.name)] == [str(T4)]
            # --everything says what it removes, whoever owns it
            assert _cli("unlock", "--everything", "--netns", ns.name) == 0
            out = capsys.readouterr().out
            assert out.startswith("removed every lock (1, of any owner) and the sockrepair table")
            assert f"  {T4}  owner sockrepair pid=" in out
            assert _cli("locks", "--netns", ns.name) == 0
            assert "no locked connections" in capsys.readouterr().out
            assert nft_status(ns.name)["table_present"] is False
        finally:
            lockmod.unlock_all(netns=ns.name)
            lockmod.close_cached_lockers()


def test_status_reports_a_working_lock(locker: Locker) -> None:
    status = nft_status()
    assert status["available"] and not status["table_present"] and status["intact"]
    locker.lock([T4], ttl=30)
    status = nft_status()
    assert (status["table_present"], status["intact"], status["rules"], status["locks"]) == (True, True, 15, 1)
    locker.unlock([T4])


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_nft_sees_the_same_table(locker: Locker) -> None:
    locker.lock([T4], ttl=30)
    locker.lock([T6], ttl=30, group=49430)
    text = subprocess.run(
        ["nft", "list", "table", "inet", "sockrepair"], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"10\.0\.0\.1 \. 1000 \. 10\.0\.0\.2 \. 2000 timeout 30s expires \S+ comment \"pytest pid=\d+ "
                     r"host=[^\"]+\" : drop", text)
    assert re.search(r"fd00::1 \. 1000 \. fd00::2 \. 2000 timeout 30s expires \S+ comment \"[^\"]+\" : jump keep_49430",
                     text)
    for family in ("ipv4_addr", "ipv6_addr"):
        assert f"type {family} . inet_service . {family} . inet_service : verdict" in text
    for hook in ("prerouting", "input", "output"):
        assert f"type filter hook {hook} priority raw" in text
    assert text.count("meta mark 0x0000c114 accept") == 3  # SOCCR_MARK passes every chain
    # the peer side goes to the element's verdict in prerouting and input, then (a jump that returned) is dropped;
    # input and output drop the socket's own side
    assert text.count("vmap @conn4") == 2 and text.count("vmap @conn6") == 2
    assert text.count("@conn4 drop") == 4 and text.count("@conn6 drop") == 4
    assert "chain keep_49430 {\n\t\tlog group 49430 snaplen 65535 queue-threshold 1 drop\n\t}" in text
    assert "keep_49428" not in text  # keep chains are made for the groups locked with only
    locker.unlock([T4, T6])
    locker.unlock_all()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert "sockrepair" not in tables


def _groups(locker: Locker) -> dict[ConnTuple, int | None]:
    return {r.tuple: r.group for r in locker.list_locks()}


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_renewal_keeps_a_recorders_group_and_never_an_accept(locker: Locker) -> None:
    """A tuple locked with a group stays with it when renewed without one (a put-back, criu's renewal, `sockrepair
    lock`), switches to another group given explicitly, and an element another tool gave `accept` becomes `drop`."""
    locker.lock([T4, T6], ttl=30, group=49428)
    locker.lock([T4, T6, MAPPED], ttl=40)
    assert _groups(locker) == {T4: 49428, T6: 49428, MAPPED.wire(): None}
    assert {r.ttl for r in locker.list_locks()} == {40.0}
    locker.lock([T4, MAPPED], ttl=40, group=49431)
    assert _groups(locker) == {T4: 49431, T6: 49428, MAPPED.wire(): 49431}
    other = ConnTuple(socket.AF_INET, "10.0.0.7", 7000, "10.0.0.8", 8000)
    subprocess.run(["nft", "add element inet sockrepair conn4 { 10.0.0.7 . 7000 . 10.0.0.8 . 8000 : accept }"],
                   check=True)
    locker.lock([other], ttl=30)
    assert _groups(locker)[other] is None
    text = subprocess.run(["nft", "list", "map", "inet", "sockrepair", "conn4"], capture_output=True, text=True,
                          check=True).stdout
    assert "accept" not in text
    locker.unlock([T4, T6, MAPPED, other])


_OLD_LAYOUT = """table inet sockrepair {
    set conn4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; timeout 60s; }
    set conn6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; flags timeout; timeout 60s; }
    chain prerouting { type filter hook prerouting priority raw; meta mark 0x0000c114 accept;
        ip daddr . tcp dport . ip saddr . tcp sport @conn4 log group 49428 snaplen 65535 queue-threshold 1 drop; }
    chain input { type filter hook input priority raw; ip saddr . tcp sport . ip daddr . tcp dport @conn4 drop; }
    chain output { type filter hook output priority raw; ip saddr . tcp sport . ip daddr . tcp dport @conn4 drop; }
}
"""


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_a_table_of_the_older_layout_is_refused_while_it_holds_locks_then_replaced(locker: Locker) -> None:
    """The sets of an older sockrepair (no verdicts) are never mixed with the maps: refused with a LockError while
    one of their elements is locked (nothing changes), replaced in one transaction once they are empty."""
    subprocess.run(["nft", "-f", "-"], input=_OLD_LAYOUT, text=True, check=True)
    subprocess.run(["nft", "add element inet sockrepair conn4 { 10.0.0.9 . 9 . 10.0.0.8 . 8 timeout 30s }"],
                   check=True)
    with pytest.raises(LockError, match="older sockrepair layout .* still holds locks"):
        locker.lock([T4], ttl=30, group=49428)
    text = subprocess.run(["nft", "list", "table", "inet", "sockrepair"], capture_output=True, text=True,
                          check=True).stdout
    assert "10.0.0.9 . 9 . 10.0.0.8 . 8" in text and "vmap" not in text and "10.0.0.1" not in text
    subprocess.run(["nft", "flush set inet sockrepair conn4"], check=True)
    locker.lock([T4], ttl=30, group=49428)
    assert _groups(locker) == {T4: 49428}
    assert locker.rule_count() == 15
    locker.unlock([T4])


def test_prepare_builds_the_keep_chain_so_that_the_lock_sends_only_its_elements(
        locker: Locker, monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate() prepares before the freeze: inside it, a lock with its recorder's group is one message."""
    locker.prepare(49432)
    sent: list[list[int]] = []
    real = locker._sock.transact

    def transact(reqs, commit=True):  # type: ignore[no-untyped-def]
        sent.append([r.msg_type for r in reqs])
        return real(reqs, commit)

    monkeypatch.setattr(locker._sock, "transact", transact)
    locker.lock([T4], ttl=30, group=49432)
    assert sent == [[nfconst.NFT_MSG_NEWSETELEM]]
    assert _groups(locker) == {T4: 49432}
    locker.unlock([T4])
