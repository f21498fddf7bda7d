"""Several movers in one network namespace: each recorder binds an nfnetlink_log group of its own, and the lock sends
each locked tuple's packets to its mover's group (its element's `jump keep_G`). Both movers keep what their peers
send, each receives only its own peers' packets, and no peer retransmits. With one group per namespace the second
mover could not bind (EPERM) and its peers waited their retransmission timeout. A tuple locked without a group is
still only dropped: never copied, never answered."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

import sockrepair
from sockrepair.lab.recorder import Recorder as WireRecorder
from sockrepair.lock import Locker
from sockrepair.lock.inject import Injector
from sockrepair.lock.record import Recorder
from sockrepair.lock.ruleset import NFLOG_GROUP
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState
from tests.root.pairs import (
    FAMILIES,
    assert_alive_and_silent,
    loopback_pair,
    recv_exactly,
    tcp_info,
    wait_for,
)

pytestmark = pytest.mark.root


def _payload(packet: bytes) -> bytes:
    """The TCP payload of a whole IPv4 or IPv6 packet (loopback: no IPv6 extension headers)."""
    ip_len = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    return packet[ip_len + (packet[ip_len + 12] >> 4) * 4 :]


def _out_rsts() -> int:
    """Tcp OutRsts of this network namespace: every RST any socket here sent."""
    with open("/proc/thread-self/net/snmp") as f:
        head, values = [line.split() for line in f if line.startswith("Tcp:")]
    return int(values[head.index("OutRsts")])


def _locked_away(locker: Locker, server: socket.socket, group: int | None) -> ConnectionState:
    state = sockrepair.checkpoint(server)
    locker.lock([state], ttl=30, group=group)
    sockrepair.discard(server, state)  # no socket holds the tuple now: an unlocked packet would meet a RST
    return state


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_two_movers_in_one_namespace_each_keep_only_their_own_peers_packets(
    locker: Locker, family: int, listen_addr: str, connect_addr: str
) -> None:
    pairs = [loopback_pair(family, listen_addr, connect_addr) for _ in range(2)]
    messages = [b"to the first mover", b"to the second mover, longer"]
    with pairs[0][0], pairs[1][0], Recorder() as first, Recorder() as second:
        assert (first.group, second.group) == (NFLOG_GROUP, NFLOG_GROUP + 1)
        states = []
        for (client, server), recorder in zip(pairs, (first, second), strict=True):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            states.append(_locked_away(locker, server, recorder.group))
        assert {r.tuple: r.group for r in locker.list_locks()} == {
            states[0].tuple.wire(): first.group, states[1].tuple.wire(): second.group}
        for (client, _), message in zip(pairs, messages, strict=True):
            client.sendall(message)
        conns = [s.tuple for s in states]
        wait_for(lambda: first.pending(conns) + second.pending(conns) == 2, "both peers' packets to be kept", 5.0)
        # each recorder holds its own peer's packet, byte for byte, and nothing of the other's
        assert [[_payload(p) for p in kept] for kept in first.peek(conns)] == [[messages[0]], []]
        assert [[_payload(p) for p in kept] for kept in second.peek(conns)] == [[], [messages[1]]]
        restored = [sockrepair.restore(state) for state in states]
        try:
            for recorder, conn in zip((first, second), conns, strict=True):
                held = recorder.take([conn])
                assert (len(held.packets), held.fell_back) == (1, 0)
                with Injector() as injector:
                    assert injector.send(held.packets) == 1
            locker.unlock(states)
            for sock, message, (client, _) in zip(restored, messages, pairs, strict=True):
                assert recv_exactly(sock, len(message)) == message
                sock.sendall(b"answer")
                assert recv_exactly(client, 6) == b"answer"
                # delivered from the recording, not by a retransmission: for both movers' peers
                assert tcp_info(client)[2] == 0
        finally:
            for sock in restored:
                sock.close()


def test_a_lock_without_a_group_drops_and_copies_nothing(netns: NetNS, locker: Locker) -> None:
    """Beside a mover that records, a tuple locked without a group (`sockrepair lock`) is dropped silently: its
    peer's packets reach no recorder, no RST leaves (on the wire and in Tcp OutRsts), the peer stays ESTABLISHED
    and its retransmission delivers the bytes after the restore and unlock."""
    client, server = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    wire = WireRecorder("lo", netns.name).start()
    try:
        with client, Recorder() as mover:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = _locked_away(locker, server, None)
            [record] = locker.list_locks()
            assert record.group is None
            text = subprocess.run(["nft", "list", "map", "inet", "sockrepair", "conn4"], capture_output=True,
                                  text=True, check=True).stdout
            assert text.rstrip().count(": drop") == 1 and "jump" not in text
            rsts = _out_rsts()
            client.sendall(b"only dropped")
            wait_for(lambda: tcp_info(client)[2] >= 1, "the peer's retransmission")
            assert mover.pending([state.tuple]) == 0 and mover.take([state.tuple]).packets == []
            assert_alive_and_silent(client)
            assert _out_rsts() == rsts, "a RST was sent"
            with sockrepair.restore(state) as restored:
                locker.unlock([state])
                assert recv_exactly(restored, 12) == b"only dropped"
        time.sleep(0.05)  # the last frames reach the capture socket
    finally:
        wire.stop()
    conn = state.tuple
    ours = [g for g in wire.segments() if {g.src_port, g.dst_port} == {conn.local_port, conn.remote_port}]
    assert ours, "the capture saw the connection"
    assert not [g for g in ours if g.flags & 0x04], "a RST was on the wire"
