"""`sockrepair criu restore` delivers what the lock kept: what a peer sent between `criu dump` and `criu restore`
(kept by the dump's detached keeper, then by the restore that takes its recorder over), and what it sent between
the delivery and the unlock (a delivery after the unlock): the peer's request reaches the restored program without
a retransmission."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sockrepair.criu import driver
from sockrepair.criu.locate import Criu
from sockrepair.image.keptlog import NAME as KEPT
from sockrepair.image.keptlog import decode_keptlog
from sockrepair.move import keep as keep_module
from sockrepair.move.keeper import RECORD
from sockrepair.move.procfs import stat
from sockrepair.netns import NetNS
from tests.root.keeping import request_before_the_unlock
from tests.root.pairs import recv_exactly, tcp_info, wait_for
from tests.root.test_criu_trees import Program, programs

pytestmark = pytest.mark.root

PORT = 7031
REQUEST = b"sent after the delivery"


@contextmanager
def _echo_server(ns: NetNS, work: Path) -> Iterator[tuple[Program, socket.socket]]:
    """The criu tests' echo server on PORT in `ns` and a client of it that has echoed b"hello"."""
    server = Program(ns, work, "server", "server", str(PORT))
    with programs(server):
        with ns.entered():
            client = socket.create_connection(("127.0.0.1", PORT))
        with client:
            client.sendall(b"hello")
            assert recv_exactly(client, 5) == b"hello"
            yield server, client


def test_restore_delivers_what_came_between_the_delivery_and_the_unlock(
        criu: Criu, ns: NetNS, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _echo_server(ns, work) as (server, client):
        driver.dump([server.pid], work / "img", allow_external_peers=True, criu=criu)
        sent = request_before_the_unlock(monkeypatch, keep_module, client, REQUEST)
        with ns.entered():
            report = driver.restore(work / "img", criu=criu)
        assert sent, "the restore did not unlock through Locker.unlock"
        assert recv_exactly(client, len(REQUEST)) == REQUEST  # echoed by the restored program
        assert tcp_info(client)[2] == 0
    assert report.kept.delivered >= 1 and report.kept.fell_back == 0


def test_a_request_sent_between_criu_dump_and_restore_arrives_without_retransmission(
        criu: Criu, ns: NetNS, work: Path) -> None:
    """The peer's minimum RTO is 8 s (its route's rto_min, which delays the tail-loss probe too), so that criu's
    runs never race its timers: without the keeper the request would wait them and be counted retransmitted."""
    ns.ip("route", "replace", "table", "local", "local", "127.0.0.1", "dev", "lo", "proto", "kernel", "scope", "host",
          "src", "127.0.0.1", "rto_min", "8s")
    with _echo_server(ns, work) as (server, client):
        dumped = driver.dump([server.pid], work / "img", allow_external_peers=True, criu=criu)
        assert "a keeper (pid" in dumped.kept.note
        keeper = int(json.loads((work / "img" / RECORD).read_text())["pid"])
        client.sendall(REQUEST)
        wait_for(lambda: len(decode_keptlog((work / "img" / KEPT).read_bytes()).packets) == 1,
                 "the keeper to record the request")
        with ns.entered():
            report = driver.restore(work / "img", criu=criu)
        assert recv_exactly(client, len(REQUEST)) == REQUEST  # echoed by the restored program
        assert tcp_info(client)[2] == 0
    assert (report.kept.delivered, report.kept.fell_back) == (1, 0)
    assert stat(keeper) is None or stat(keeper).zombie  # type: ignore[union-attr]
