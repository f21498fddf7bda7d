"""The mover's second probe (sockrepair.move.ask), forced: RETRY_AFTER 0 and the first answer not looked at, as if
lost on the way. The peer answers both probes, with SACK and without it (net.ipv4.tcp_sack=0 in the test's
namespace: the restored socket counts the duplicate ACKs toward its fast retransmit), and neither the restored
socket nor the peer retransmits anything; every byte reaches the peer once."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence

import pytest

from sockrepair.lock import Locker
from sockrepair.move import ask
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState
from tests.root import test_inflight
from tests.root.conftest import Pair
from tests.root.pairs import recv_exactly, wait_for
from tests.root.test_inflight import (
    IN_FLIGHT,
    SIOCINQ,
    SIOCOUTQ,
    TCP_CA_OPEN,
    TTL_LOST,
    Timers,
    grow_the_window,
    info,
    ioctl_int,
    move_kept,
    pattern,
    send_in_flight,
    set_ttl,
    timers,
)

# the fixtures of test_inflight's in-flight setups
ethernet_pair, losing = test_inflight.ethernet_pair, test_inflight.losing


@pytest.fixture
def sack(request: pytest.FixtureRequest, netns: NetNS) -> Iterator[int]:
    """net.ipv4.tcp_sack in the test's namespace (a per-namespace sysctl)."""
    subprocess.run(["sysctl", "-qw", f"net.ipv4.tcp_sack={request.param}"], check=True)
    yield request.param


@pytest.fixture
def probes_sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """ask's probes, forced to be sent twice (the first answer is not looked at, as if lost on the way): how many
    states each send carried."""
    sent: list[int] = []
    send, answered = ask._send_probes, ask._answered

    def first_missed(state: ConnectionState, new: Sequence[bytes]) -> bool:
        if len(sent) < 2:
            return False
        return answered(state, new)

    def counted(into: str, states: Sequence[ConnectionState]) -> bool:
        sent.append(len(states))
        return send(into, states)

    monkeypatch.setattr(ask, "RETRY_AFTER", 0.0)
    monkeypatch.setattr(ask, "_send_probes", counted)
    monkeypatch.setattr(ask, "_answered", first_missed)
    return sent


@pytest.mark.parametrize("sack", [1, 0], indirect=True, ids=["sack", "nosack"])
def test_a_second_probe_costs_no_retransmission(
        sack: int, ethernet_pair: Callable[[int, str], Pair], locker: Locker, losing: None,
        probes_sent: list[int]) -> None:
    client, server = ethernet_pair(socket.AF_INET, "127.0.0.1")
    grow_the_window(client, server)
    lost = pattern(IN_FLIGHT)
    set_ttl(server, TTL_LOST)
    send_in_flight(server, lost)
    with move_kept(server, locker) as (restored, asked, _):
        assert asked.states[0].options.sack == bool(sack)
        assert asked.answered == [True] and bytes(asked.states[0].unacked) == lost
        assert recv_exactly(client, len(lost)) == lost
        wait_for(lambda: ioctl_int(restored, SIOCOUTQ) == 0, "the peer to acknowledge every byte", 5.0)
        after, clock = info(restored), timers(restored)
    assert probes_sent == [1, 1]
    assert (after.ca_state, clock, after.total_retrans) == (TCP_CA_OPEN, Timers(0, 0), 0)
    assert info(client).total_retrans == 0 and ioctl_int(client, SIOCINQ) == 0
