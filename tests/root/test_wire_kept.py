"""The wire recorder and `sockrepair verify` account for the packets sockrepair's lock kept and delivered: captured
on the namespace's loopback, the peer's request is seen when the peer sends it (and the lock drops it) and again
when it is delivered to the restored socket; the second is counted as delivered, with its delay, and not as a
retransmission. With the dropping lock the peer's own retransmission is seen instead, and counted as one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sockrepair
from sockrepair.lab.recorder import Recorder
from sockrepair.netns import NetNS
from sockrepair.state import ConnTuple
from tests.root.pairs import recv_exactly, tcp_info
from tests.root.programs import echo_connection

REQUEST = b"GET /kept-on-the-wire"


def _keep_sockets(socks: list[socket.socket], _tuples: object) -> list[socket.socket]:
    return socks


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])  # IPv6: told apart by TSval alone
@pytest.mark.parametrize("keep", [True, False], ids=["keeping", "dropping"])
def test_a_capture_of_a_move_counts_the_delivered_copies(keep: bool, addr: str, tmp_path: Path) -> None:
    with NetNS() as ns:
        with echo_connection(ns, addr) as (server, client):
            conn = ConnTuple(client.family, *client.getsockname()[:2], *client.getpeername()[:2])
            rec = Recorder("lo", ns.name).start()  # after the handshake, until before the close
            try:
                report = sockrepair.migrate(server.pid, dest_netns=ns.name, handoff=_keep_sockets, keep=keep,
                                            network=lambda: client.sendall(REQUEST))
                [restored] = report.handoff_result
                with restored:
                    assert recv_exactly(restored, len(REQUEST)) == REQUEST
                    restored.sendall(b"200 OK")
                    assert recv_exactly(client, 6) == b"200 OK"
                    retransmitted = tcp_info(client)[2]
                    rec.stop()
            finally:
                rec.stop()
            wire = rec.report(conn)
            rec.write_pcap(tmp_path / "move.pcap")
    peer = wire.directions[0]  # client -> server
    assert wire.ok, wire.problems
    if keep:
        assert retransmitted == 0 and report.kept.delivered >= 1
        # every packet sockrepair delivered is seen twice on the wire, and only those
        assert peer.delivered == report.kept.delivered
        assert peer.retransmitted_bytes == 0
        assert all(0 < delay < 10 for delay in peer.delivered_delays)
    else:
        assert retransmitted >= 1
        assert peer.delivered == 0 and peer.retransmitted_bytes >= len(REQUEST)
    done = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "verify", str(tmp_path / "move.pcap"),
                           "--tuple", str(conn), "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)["directions"][0]
    assert (shown["delivered"], shown["retransmitted_bytes"]) == (peer.delivered, peer.retransmitted_bytes)
    assert shown["delivered_delays"] == pytest.approx(peer.delivered_delays, abs=1e-6)
