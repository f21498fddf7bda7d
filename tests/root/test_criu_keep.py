"""`sockrepair criu restore` delivers what the lock kept, also what a peer sent between the delivery and the unlock
(a delivery after the unlock): the peer's request reaches the restored program without a retransmission."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sockrepair.criu import driver
from sockrepair.criu.locate import Criu
from sockrepair.lock import Locker
from sockrepair.move.keep import Keeper
from sockrepair.netns import NetNS
from sockrepair.state import ConnTuple
from tests.root.pairs import recv_exactly, tcp_info, wait_for
from tests.root.test_criu_trees import Program, programs

pytestmark = pytest.mark.root

PORT = 7031
REQUEST = b"sent after the delivery"


def test_restore_delivers_what_came_between_the_delivery_and_the_unlock(
        criu: Criu, ns: NetNS, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keepers: list[Keeper] = []

    class Watched(Keeper):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            keepers.append(self)

    real_unlock = Locker.unlock
    sent: list[ConnTuple] = []

    def unlock_after_a_request(self: Locker, items: list[ConnTuple], *args: object, **kwargs: object) -> object:
        if keepers and items and not sent:  # the restore's unlock: the delivery is over, the connection locked
            sent[:] = items
            client.sendall(REQUEST)
            wait_for(lambda: keepers[0].pending(items) == 1, "the request to reach the lock", 5.0)
        return real_unlock(self, items, *args, **kwargs)

    server = Program(ns, work, "server", "server", str(PORT))
    with programs(server):
        with ns.entered():
            client = socket.create_connection(("127.0.0.1", PORT))
        with client:
            client.sendall(b"hello")
            assert recv_exactly(client, 5) == b"hello"
            driver.dump([server.pid], work / "img", allow_external_peers=True, criu=criu)
            monkeypatch.setattr(driver, "Keeper", Watched)
            monkeypatch.setattr(Locker, "unlock", unlock_after_a_request)
            with ns.entered():
                report = driver.restore(work / "img", criu=criu)
            assert sent, "the restore did not unlock through Locker.unlock"
            assert recv_exactly(client, len(REQUEST)) == REQUEST  # echoed by the restored program
            assert tcp_info(client)[2] == 0
    assert report.kept.delivered >= 1 and report.kept.fell_back == 0
