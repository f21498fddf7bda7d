"""criu's images of real connections: `criu compare` agrees with criu on 100 connections (and explains what moves
while a connection is busy); `criu show` and `sockrepair restore --from-criu` read real dumps and put every queued
byte back."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sockrepair.cli.main import main as sockrepair_main
from sockrepair.criu import driver
from sockrepair.criu.compare import (
    DIFFERS,
    EXPLAINED,
    NOT_IN_CRIU,
    NOT_KEPT,
    SAME,
    compare,
)
from sockrepair.criu.locate import Criu
from sockrepair.criu.manifest import LOCK_SKIP
from sockrepair.criu.show import load_states
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState, ConnTuple
from tests.clihelp import run_main
from tests.root.test_criu_trees import Program, counting, criu_cli, locks_in, programs  # noqa: F401

pytestmark = pytest.mark.root


def test_compare_agrees_with_criu_on_100_connections(criu: Criu, ns: NetNS, work: Path) -> None:
    tree = Program(ns, work, "pairs", "pairs", "100", "127.0.0.1", "20000", "fill")
    with programs(tree):
        result = compare(tree.pid, criu=criu)
        assert result.ok, json.dumps(result.to_dict(), indent=1)[:3000]
        assert len(result.connections) == 200 and result.missing == []
        for conn in result.connections:
            moved = {f.name: f.verdict for f in conn.fields if f.verdict != SAME}
            # An idle connection: only the timestamp clock moves; criu has no field for the options the registry
            # marks criu=False (the congestion control, TCP_LINGER2, TCP_WINDOW_CLAMP...).
            not_kept = {f"sockopts.{name}" for name in NOT_IN_CRIU}
            assert set(moved) <= {"timestamp"} | not_kept, (conn.tuple, moved)
            assert "sockopts.congestion" in moved
            assert moved.get("timestamp", EXPLAINED) == EXPLAINED
            assert all(moved[name] == NOT_KEPT for name in not_kept & set(moved)), moved
        code, text = criu_cli("compare", "--pid", str(tree.pid))
        assert code == 0 and text.rstrip().endswith("criu agrees with sockrepair")
        assert tree.proc.poll() is None, "compare must leave the process running"


def test_compare_explains_what_traffic_moves(criu: Criu, ns: NetNS, work: Path) -> None:
    server = Program(ns, work, "server", "server", "7022")
    client = Program(ns, work, "client", "client", "7022")
    with programs(server, client):
        client.wait_output(lambda lines: len(lines) >= 3)
        for _ in range(3):
            result = compare(client.pid, criu=criu)
            assert result.ok, json.dumps(result.to_dict(), indent=1)
            assert [f.verdict for c in result.connections for f in c.fields if f.verdict == DIFFERS] == []
        count = len(client.lines())
        lines = client.wait_output(lambda lines: len(lines) >= count + 5 or not counting(lines))
    assert counting(lines) and len(lines) >= count + 5, "the echo must go on after the comparisons"


@contextlib.contextmanager
def receiving(path: Path) -> Iterator[Callable[[], list[tuple[ConnTuple, socket.socket]]]]:
    """A UNIX socket that takes the connections `sockrepair restore --unix` passes (SCM_RIGHTS); the block gets a
    function that returns them once the sender is done."""
    got: list[tuple[ConnTuple, socket.socket]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def take() -> None:
            conn, _ = listener.accept()
            with conn:
                while True:
                    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 253)
                    if not data:
                        return
                    names = json.loads(data[4 : 4 + int.from_bytes(data[:4], "big")])
                    got.extend((ConnTuple.parse(n), socket.socket(fileno=fd)) for n, fd in zip(names, fds))

        thread = threading.Thread(target=take, daemon=True)
        thread.start()

        def collected() -> list[tuple[ConnTuple, socket.socket]]:
            thread.join(timeout=30)
            return got

        try:
            yield collected
        finally:
            for _, s in got:
                s.close()


def expected_stream(receiver: ConnectionState, sender: ConnectionState) -> bytes:
    """What the receiver will read: its unread queue, then what the sender kept that the receiver had not got."""
    sent_from = (sender.send_seq - len(sender.send_queue)) % 2**32
    overlap = (receiver.recv_seq - sent_from) % 2**32
    assert overlap <= len(sender.send_queue)
    return receiver.recv_queue + sender.send_queue[overlap:]


def read_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(30)
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_show_and_restore_from_criu_round_trip(criu: Criu, ns: NetNS, work: Path) -> None:
    pairs, payload = 5, 3000
    tree = Program(ns, work, "pairs", "pairs", str(pairs), "127.0.0.1", str(payload), "fill")
    (filled,) = tree.extra
    with programs(tree):
        driver.dump([tree.pid], work / "img", criu=criu)
    states = load_states(work / "img")
    assert load_states(work / "img" / f"tree-{tree.pid}") == states
    code, text = criu_cli("show", str(work / "img"), "--json")
    shown = json.loads(text)
    assert code == 0 and shown["dump"]["network_lock"] == LOCK_SKIP
    assert [c for t in shown["trees"] for c in t["connections"]] == [s.to_dict() for s in states]
    code, text = criu_cli("show", str(work / "img"))
    assert code == 0 and all(str(s.tuple) in text for s in states)

    by_tuple = {s.tuple: s for s in states}
    expected = {s.tuple: expected_stream(s, by_tuple[s.tuple.reversed()]) for s in states}
    client = [bytes((i + j) % 251 for j in range(payload)) for i in range(pairs)]
    server = [bytes((i + 7 * j + 3) % 253 for j in range(payload)) for i in range(pairs)]
    client[0] += bytes((13 * k + 5) % 251 for k in range(filled))
    assert sorted(expected.values()) == sorted(client + server)
    assert len(locks_in(ns)) == 2 * pairs

    with receiving(work / "take.sock") as collected:
        code = sockrepair_main(["restore", "--from-criu", str(work / "img"), "--netns", ns.name,
                                "--unix", str(work / "take.sock")])
        assert code == 0
        got = collected()
        assert sorted(t for t, _ in got) == sorted(expected)
        assert locks_in(ns) == []
        socks = dict(got)
        for conn, sock in socks.items():
            assert read_exactly(sock, len(expected[conn])) == expected[conn], conn
        for conn, sock in socks.items():
            sock.sendall(b"after restore")
            assert read_exactly(socks[conn.reversed()], 13) == b"after restore"
    assert os.path.exists(work / "img" / "sockrepair-criu.json")
    # restored and unlocked: a second restore would bring back connections that live on (refused, unless --force)
    code, _, err = run_main("restore", "--from-criu", str(work / "img"), "--netns", ns.name, "--unix",
                            str(work / "take.sock"))
    assert code == 1 and "not restoring stale images" in err and "are not locked here" in err, err
