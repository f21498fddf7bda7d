"""The lock keeps what it stops: a peer's packets sent while its connection is between sockets are recorded at
prerouting and delivered to the restored socket, so the peer retransmits nothing (its TCP_INFO says so). These tests
fail on a lock that only drops: the bytes would come only with the peer's retransmission."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import sockrepair
from sockrepair.lab.recorder import Recorder as WireRecorder
from sockrepair.lock import Locker
from sockrepair.lock.inject import Injector
from sockrepair.lock.record import KeepCaps, Recorder
from sockrepair.netns import NetNS
from sockrepair.packet import packet_tuple, with_checksums
from sockrepair.state import ConnTuple
from tests.root.pairs import (
    FAMILIES,
    TCP_ESTABLISHED,
    assert_alive_and_silent,
    loopback_pair,
    recv_exactly,
    tcp_info,
    wait_for,
)

pytestmark = pytest.mark.root


def _move_keeping(locker: Locker, recorder: Recorder, server: socket.socket, client: socket.socket,
                  messages: list[bytes]) -> tuple[socket.socket, int, int]:
    """Checkpoint and lock the server's end, silence it, let the client send `messages` (one segment each) while no
    socket exists, restore, deliver what was kept, unlock. Returns the restored socket, the packets delivered and
    the copies that fell back to the peer's retransmission."""
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    state = sockrepair.checkpoint(server)
    locker.lock([state], ttl=30, group=recorder.group)
    sockrepair.discard(server, state)
    for message in messages:
        client.sendall(message)
        time.sleep(0.005)  # one segment each: the next waits until the previous left
    restored = sockrepair.restore(state)
    held = recorder.take([state.tuple])
    with Injector() as injector:
        sent = injector.send(held.packets)
    locker.unlock([state])
    return restored, sent, held.fell_back


@pytest.mark.parametrize(("family", "listen_addr", "connect_addr"), FAMILIES)
def test_a_message_sent_while_locked_arrives_without_retransmission(
    locker: Locker, family: int, listen_addr: str, connect_addr: str
) -> None:
    client, server = loopback_pair(family, listen_addr, connect_addr)
    with client, Recorder() as recorder:
        assert tcp_info(client)[2] == 0
        restored, sent, fell_back = _move_keeping(locker, recorder, server, client, [b"sent while locked"])
        with restored:
            assert (sent, fell_back) == (1, 0)
            # delivered with the unlock, not by a retransmission: the bytes are queued already
            restored.setblocking(False)
            wait_for(lambda: restored.recv(64, socket.MSG_PEEK) == b"sent while locked", "the kept bytes", 2.0)
            assert tcp_info(client)[2] == 0, "the peer retransmitted: the kept packet did not reach the new socket"
            restored.sendall(b"answer")
            assert recv_exactly(client, 6) == b"answer"
            assert tcp_info(client)[2] == 0


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_a_packet_that_passed_prerouting_before_the_lock_is_kept_at_input(locker: Locker) -> None:
    """A packet that passed prerouting an instant before the lock was taken meets the lock at input: it is copied
    there too and delivered, instead of waiting for the peer's retransmission. The prerouting rules are removed so
    that every packet takes that path."""
    client, server = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with client, Recorder() as recorder:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state = sockrepair.checkpoint(server)
        locker.lock([state], ttl=30, group=recorder.group)
        subprocess.run(["nft", "flush", "chain", "inet", "sockrepair", "prerouting"], check=True)
        sockrepair.discard(server, state)
        client.sendall(b"passed prerouting")
        wait_for(lambda: recorder.pending([state.tuple]) == 1, "the input chain's copy", 5.0)
        restored = sockrepair.restore(state)
        held = recorder.take([state.tuple])
        with Injector() as injector:
            assert (injector.send(held.packets), held.fell_back) == (1, 0)
        locker.unlock([state])
        with restored:
            assert recv_exactly(restored, 17) == b"passed prerouting"
            assert tcp_info(client)[2] == 0




@pytest.mark.parametrize(("family", "server_addr", "connect_addr"),
                         [(socket.AF_INET, "10.77.0.1", "10.77.0.1"), (socket.AF_INET6, "fd77::1", "fd77::1"),
                          (socket.AF_INET6, "::", "10.77.0.1")],
                         ids=["ipv4", "ipv6", "v4-mapped"])
def test_a_peer_on_another_host_retransmits_nothing(two_hosts: tuple[NetNS, NetNS], family: int,
                                                     server_addr: str, connect_addr: str) -> None:
    a, b = two_hosts
    with a.entered():
        listener = socket.socket(family)
        listener.bind((server_addr, 0))
        listener.listen()
        locker, recorder = Locker(label="pytest"), Recorder()
    with listener, locker, recorder:
        with b.entered():
            client = socket.create_connection((connect_addr, listener.getsockname()[1]))
        server, _ = listener.accept()
        assert server.getsockname()[0] == ("::ffff:" + connect_addr if server_addr == "::" else server_addr)
        with client:
            with a.entered():
                # one segment: with several out, the peer's tail-loss probe may resend within milliseconds
                restored, sent, fell_back = _move_keeping(locker, recorder, server, client, [b"one message"])
            with restored:
                assert (sent, fell_back) == (1, 0)
                assert recv_exactly(restored, 11) == b"one message"
                assert tcp_info(client)[2] == 0
            locker.unlock_all()


def test_over_the_cap_the_peer_resends_and_the_count_says_so(locker: Locker) -> None:
    client, server = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with client, Recorder(caps=KeepCaps(packets_per_connection=1)) as recorder:
        restored, sent, fell_back = _move_keeping(locker, recorder, server, client, [b"first", b"second", b"third"])
        with restored:
            # the two not kept, and any retransmission the peer's tail-loss probe sent meanwhile
            assert sent == 1 and fell_back >= 2
            # the two that were not kept come with the peer's retransmission
            assert recv_exactly(restored, 16) == b"firstsecondthird"
            assert tcp_info(client)[2] >= 1


HOLDER = """
import sys, time
from sockrepair.lock.record import Recorder
r = Recorder()
print("bound", r.group, flush=True)
time.sleep(60)
"""


def test_a_dead_holder_leaves_the_lock_dropping_never_answering(netns: NetNS, locker: Locker) -> None:
    client, server = loopback_pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with client:
        state = sockrepair.checkpoint(server)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            assert holder.stdout is not None
            word, group = holder.stdout.readline().split()
            assert word == "bound"
            # the element jumps to the holder's keep chain, which goes on dropping once nobody reads the group
            locker.lock([state], ttl=30, group=int(group))
            sockrepair.discard(server, state)  # no socket holds the tuple now: an unlocked packet would get RST
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
        conn = ConnTuple(client.family, *client.getsockname()[:2], *client.getpeername()[:2])
        with WireRecorder("lo", netns.name) as wire:
            client.sendall(b"anyone?")
            wait_for(lambda: tcp_info(client)[2] >= 1, "the peer's retransmission")
            wire.stop()
        assert_alive_and_silent(client)  # dropped, not answered: no RST reached the peer
        seen = wire.report(conn).directions
        # the message and its retransmission reached the wire, and nothing answered them
        assert seen[0].data_segments >= 2 and [d.rst for d in seen] == [0, 0]
        [record] = locker.list_locks()
        assert record.tuple == state.tuple and 0 < record.seconds_left <= 30  # still locked, and still expiring
        assert record.group == int(group)
        with sockrepair.restore(state) as restored:
            locker.unlock([state])
            assert recv_exactly(restored, 7) == b"anyone?"
            assert tcp_info(client)[0] == TCP_ESTABLISHED


@pytest.mark.parametrize("version", [4, 6])
def test_checksums_are_made_right_whatever_the_copy_held(version: int) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    layer = IP(src="10.0.0.2", dst="10.0.0.1") if version == 4 else IPv6(src="fd00::2", dst="fd00::1")
    right = bytes(layer / TCP(sport=54321, dport=1234, seq=1, flags="PA") / b"payload!")  # scapy's own sums
    damaged = bytearray(right)
    at = 20 if version == 4 else 40
    damaged[at + 16 : at + 18] = b"\x12\x34"  # a partial sum, as an offloading sender leaves it
    if version == 4:
        damaged[10:12] = b"\x00\x00"
    assert with_checksums(bytes(damaged)) == right
    conn = packet_tuple(right)
    assert conn is not None and (conn.local_port, conn.remote_port) == (1234, 54321)
    assert conn.local_addr == ("10.0.0.1" if version == 4 else "fd00::1")
    with pytest.raises(ValueError):
        with_checksums(right[:-1])  # lengths that do not add up
