"""migrate(): a plain program's connections move to a new program while a client keeps talking."""

from __future__ import annotations

import socket
import sys
import time

import sockrepair
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.lab.subjects import PingPongClient, start_echo, stop
from sockrepair.move.handoff import spawn_with_sockets
from sockrepair.netns import NetNS
from tests.root.programs import free_port


def test_migrate_to_a_new_program_under_traffic():
    """Same namespace (the cross-host move is tested with the lab): the connections leave a killed program and
    reach a new one while the client keeps checking every echoed byte."""
    with NetNS() as ns:
        with ns.entered():
            port = free_port()
        server = start_echo(f"127.0.0.1:{port}", netns=ns.name)
        new_server = None
        client = PingPongClient("127.0.0.1", port, 3, netns=ns.name, chunk=2048, round_timeout=10)
        try:
            time.sleep(0.3)

            def handoff(socks, tuples):
                return spawn_with_sockets([sys.executable, str(ECHO_SERVER)], socks, tuples)

            called = time.monotonic()
            report = sockrepair.migrate(server.pid, dest_netns=ns.name, handoff=handoff)
            returned = time.monotonic()
            new_server = report.handoff_result
            # the program has exited before the handoff, so before migrate() returns
            exited = server.poll()
            time.sleep(0.5)
            result = client.stop(sweep_timeout=10)
        finally:
            client.close()
            stop(server)
            if new_server is not None:
                new_server.kill()
                new_server.wait()
        assert result["errors"] == [] and result["swept"], result["errors"]
        assert exited == -9
        assert len(report.connections) == 3
        # one untimed round per connection at setup; every other round, the final check of each included, is timed
        assert result["rounds"] > 20 and result["bytes_verified"] == (result["rounds"] + 3) * 2048
        # no `network` step was given: every other stage of the table, in the order it ran
        assert list(report.phases_ms) == ["freeze", "lock", "checkpoint", "serialize", "journal", "close",
                                          "restore", "deliver", "unlock", "handoff"]
        assert report.kept.recording and report.kept.fell_back == 0
        # downtime counts from the kept freeze: the freeze stage also holds the attempts a busy program cost before
        assert 0 < sum(ms for k, ms in report.phases_ms.items() if k not in ("freeze", "handoff")) <= report.downtime_ms
        # the freeze came after the call's setup, and the downtime and handoff after it, before the return
        end = report.frozen_at + (report.downtime_ms + report.phases_ms["handoff"]) / 1000
        assert called < report.frozen_at < end <= returned
        assert report.to_dict()["frozen_at"] == round(report.frozen_at, 6)
        with ns.entered():
            assert sockrepair.list_locks() == []


def test_migrate_without_a_handoff_gives_the_live_connections_to_the_caller():
    """No handoff: the restored sockets are the report's, this process's to keep. Before, the move ended by dropping
    them: the peer read EOF."""
    with NetNS() as ns:
        with ns.entered():
            port = free_port()
        server = start_echo(f"127.0.0.1:{port}", netns=ns.name)
        peer = None
        report = None
        try:
            with ns.entered():
                peer = socket.create_connection(("127.0.0.1", port), timeout=10)
                peer.sendall(b"before")
                assert peer.recv(64) == b"before"
                report = sockrepair.migrate(server.pid)
                [mine] = report.sockets
                assert mine.getpeername() == peer.getsockname()
                assert server.poll() == -9
                peer.sendall(b"after the move")
                mine.settimeout(10)
                assert mine.recv(64) == b"after the move"
                mine.sendall(b"from the caller")
                assert peer.recv(64) == b"from the caller"
                assert "sockets" not in report.to_dict()
                assert sockrepair.list_locks() == []
        finally:
            for s in [peer, *(report.sockets if report is not None else [])]:
                if s is not None:
                    s.close()
            stop(server)
