"""sockrepair.move.ask without a network: the probe it sends (sequence numbers mod 2**32, window, payload), and how
it reads the peer's answer (the highest ACK within the in-flight bytes, SACK blocks beyond it) and cuts the state."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct

import pytest

from sockrepair.engine._states import peer_segment
from sockrepair.move.ask import _answered, _cut, _held, _probe, ask_peers
from sockrepair.packet import tcp_packet, with_checksums
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)

U32 = 0xFFFFFFFF
SENT = bytes(range(256)) * 8  # 2048 bytes, of which the last UNSENT were never sent
UNSENT = 48
IN_FLIGHT = len(SENT) - UNSENT
V4 = ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 80)
V6 = ConnTuple(socket.AF_INET6, "fd00::1", 40000, "fd00::2", 80)
MAPPED = ConnTuple(socket.AF_INET6, "::ffff:10.0.0.1", 40000, "::ffff:10.0.0.2", 80)


def state(send_seq: int, conn: ConnTuple = V4, recv_seq: int = 9000) -> ConnectionState:
    return ConnectionState(
        tuple=conn, tcp_state=1, send_seq=send_seq, recv_seq=recv_seq, send_queue=SENT, unsent_len=UNSENT,
        recv_queue=b"", options=TcpOptions(1460, True, False, True, 7, 7),
        window=RepairWindow(snd_wl1=9000, snd_wnd=64000, max_window=64000, rcv_wnd=1000 << 7, rcv_wup=9000),
        timestamp=0, sockopts=SocketOptions(),
    )


def answer(s: ConnectionState, ack: int, sack: list[tuple[int, int]] = ()) -> bytes:  # type: ignore[assignment]
    """The peer's ACK of `ack`, with SACK blocks (left, right), as the recorder keeps it (IPv4, no checksums)."""
    t = s.tuple.wire()
    options = b"".join(struct.pack(">II", left & U32, right & U32) for left, right in sack)
    if options:
        options = b"\x01\x01" + bytes([5, 2 + len(options)]) + options
    packet = tcp_packet(t.family, t.remote_addr, t.remote_port, t.local_addr, t.local_port, s.recv_seq, ack, 0x10,
                        1000)
    at = 20 if t.family == socket.AF_INET else 40
    head, rest = bytearray(packet[: at + 20]), packet[at + 20 :]
    head[at + 12] = (5 + len(options) // 4) << 4
    return bytes(head) + options + rest


def test_the_probe_is_one_byte_at_snd_una_minus_1_acknowledging_rcv_nxt_across_the_wrap() -> None:
    # snd_una is 0 here: the probe's sequence number wraps to 2**32 - 1
    s = state(send_seq=len(SENT), recv_seq=U32)
    probe = with_checksums(_probe(s))
    assert len(probe) == 20 + 20 + 1
    src, dst = socket.inet_ntop(socket.AF_INET, probe[12:16]), socket.inet_ntop(socket.AF_INET, probe[16:20])
    sport, dport, seq, ack, offset, flags, window = struct.unpack_from(">HHIIBBH", probe, 20)
    assert (src, sport, dst, dport) == ("10.0.0.1", 40000, "10.0.0.2", 80)
    assert (seq, ack, offset >> 4, flags) == (U32, U32, 5, 0x10)
    assert window == 1000  # rcv_wnd >> rcv_wscale
    assert probe[-1:] == b"\0"


@pytest.mark.parametrize("conn", [V6, MAPPED], ids=["ipv6", "v4-mapped"])
def test_the_probe_of_an_ipv6_socket_is_sent_as_its_wire_family(conn: ConnTuple) -> None:
    probe = _probe(state(send_seq=5000, conn=conn))
    if conn is MAPPED:  # a v4-mapped socket's packets are IPv4 on the wire
        assert probe[0] >> 4 == 4 and probe[16:20] == socket.inet_pton(socket.AF_INET, "10.0.0.2")
    else:
        assert probe[0] >> 4 == 6 and struct.unpack_from(">H", probe, 4)[0] == 21
        assert probe[24:40] == socket.inet_pton(socket.AF_INET6, "fd00::2")
        assert struct.unpack_from(">I", probe, 44)[0] == 5000 - len(SENT) - 1


def test_a_peer_segment_goes_from_the_peer_to_us_with_its_scaled_window() -> None:
    s = state(send_seq=5000)
    segment = peer_segment(s, 0x11, U32 + 3, 77)
    assert socket.inet_ntop(socket.AF_INET, segment[12:16]) == "10.0.0.2"
    assert struct.unpack_from(">HHIIBBH", segment, 20) == (80, 40000, 2, 77, 5 << 4, 0x11, 64000 >> 7)
    assert len(with_checksums(segment)) == 40


@pytest.mark.parametrize("una", [1000, U32 - 100], ids=["plain", "across-the-wrap"])
def test_the_highest_ack_within_the_in_flight_bytes_is_what_the_peer_holds(una: int) -> None:
    s = state(send_seq=(una + len(SENT)) & U32)
    kept = [answer(s, una + 10), answer(s, una + 700), answer(s, una + 300),
            answer(s, una - 5),  # older than snd_una: not ours to count
            answer(s, una + len(SENT) + 1)]  # beyond write_seq: impossible, ignored
    assert _held(s, kept) == 700
    # the probe's D-SACK block (the byte at snd_una - 1) ends at snd_una, below the ACK
    assert _held(s, [answer(s, una + 700, [(una - 1, una)])]) == 700
    # a block beyond the ACK: the peer holds data past a hole, its next ACK could pass the first burst
    assert _held(s, [answer(s, una + 700, [(una + 900, una + 1000)])]) is None
    assert _held(s, [answer(s, una)]) == 0


def test_never_sent_bytes_an_earlier_restore_sent_are_held_and_cut() -> None:
    """A restore of the same images that was put back sent never-sent bytes, and the peer holds them: its ACK is
    beyond the image's snd_nxt. The state is cut past them; what is left of the queue is all never-sent."""
    s = state(send_seq=1000 + len(SENT))
    held = _held(s, [answer(s, 1000 + IN_FLIGHT + 20)])
    assert held == IN_FLIGHT + 20
    cut = _cut(s, held)
    assert cut.send_queue == SENT[IN_FLIGHT + 20 :] and cut.unsent_len == UNSENT - 20 == len(cut.send_queue)
    assert _held(s, [answer(s, 1000 + len(SENT))]) == len(SENT) and _cut(s, len(SENT)).unsent_len == 0


def test_the_state_is_cut_to_the_answer_keeping_the_send_windows_right_edge() -> None:
    s = state(send_seq=2**32 + 100)  # send_seq past the wrap, snd_una before it
    cut = _cut(s, 700)
    assert cut.send_queue == SENT[700:] and cut.unsent_len == UNSENT and cut.send_seq == s.send_seq
    assert cut.window is not None and s.window is not None
    assert cut.window.snd_wnd == s.window.snd_wnd - 700
    assert _cut(s, 0) is s


class _Keeper:
    """A keeper whose recorder is where the probes go, and whose peers answer `answers` (tuple -> packets)."""

    def __init__(self, answers: dict[ConnTuple, list[bytes]]) -> None:
        self.answers = answers
        self.sent: list[bytes] = []
        self.peeks = 0

    def records_in(self, path: str) -> bool:
        return True

    def peek(self, conns: list[ConnTuple]) -> list[list[bytes]]:
        self.peeks += 1
        return [list(self.answers.get(conn, [])) if self.sent else [] for conn in conns]


def _probes_into(keeper: _Keeper, monkeypatch: pytest.MonkeyPatch) -> None:
    """ask_peers' probes go to `keeper.sent` instead of a raw socket in a namespace."""

    class Injector:
        def __enter__(self) -> Injector:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def send(self, packets: list[bytes]) -> int:
            keeper.sent += packets
            return len(packets)

    monkeypatch.setattr("sockrepair.move.ask.inside", lambda path: contextlib.nullcontext())
    monkeypatch.setattr("sockrepair.move.ask.Injector", Injector)


def test_a_connection_whose_other_end_moves_too_is_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # both ends of a loopback connection in one move, and one connection to a peer that stays
    a = state(send_seq=5000, conn=ConnTuple(socket.AF_INET, "127.0.0.1", 40000, "127.0.0.1", 80))
    b = state(send_seq=7000, conn=a.tuple.reversed())
    c = state(send_seq=5000)
    una = 5000 - IN_FLIGHT - UNSENT
    keeper = _Keeper({c.tuple: [answer(c, una + 300, [(una - 1, una)])]})
    _probes_into(keeper, monkeypatch)
    asked = ask_peers(keeper, [a, b, c], "/proc/thread-self/ns/net")  # type: ignore[arg-type]
    # one probe, to the peer that stays: the moving pair's would be answered by a RST the lock drops
    assert [struct.unpack_from(">HH", p, 20) for p in keeper.sent] == [(40000, 80)]
    assert keeper.sent[0][16:20] == socket.inet_pton(socket.AF_INET, "10.0.0.2")
    assert asked.answered == [False, False, True]
    assert asked.states[:2] == [a, b] and asked.states[2].send_queue == SENT[300:]


def test_the_answers_are_read_with_one_look_per_poll_however_many_connections(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # each look drains every recorder (a recv per recorder): one per connection per poll cost milliseconds of the
    # downtime at 1,000 connections
    states = [state(send_seq=5000, conn=ConnTuple(socket.AF_INET, "10.0.0.1", 40000 + n, "10.0.0.2", 80))
              for n in range(50)]
    una = 5000 - IN_FLIGHT - UNSENT
    keeper = _Keeper({s.tuple: [answer(s, una + n, [(una - 1, una)])] for n, s in enumerate(states)})
    _probes_into(keeper, monkeypatch)
    asked = ask_peers(keeper, states, "/proc/thread-self/ns/net")  # type: ignore[arg-type]
    assert len(keeper.sent) == 50
    # before the probes, the poll that sees every answer, the answers read
    assert keeper.peeks == 3
    assert asked.answered == [True] * 50
    assert [len(s.send_queue) for s in asked.states] == [len(SENT) - n for n in range(50)]


def test_with_sack_only_the_answer_to_the_probe_counts() -> None:
    """A late packet the peer sent before the old socket's last segment reached it carries an older ACK: it is no
    answer (it would cut the state short); the answer carries the D-SACK block of the probe's byte."""
    s = state(send_seq=5000)
    una = 5000 - len(SENT)
    assert s.options.sack
    assert not _answered(s, [answer(s, una + 100)])
    assert _answered(s, [answer(s, una + 100), answer(s, una + 700, [(una - 1, una)])])
    no_sack = dataclasses.replace(s, options=dataclasses.replace(s.options, sack=False))
    assert _answered(no_sack, [answer(no_sack, una + 100)]) and not _answered(no_sack, [])


def test_a_peer_whose_answer_was_lost_is_asked_once_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first answer lost on the way (the network still sent our address to the old host): the peer is asked
    again after RETRY_AFTER, once, and its answer to the second probe cuts the state."""
    s = state(send_seq=5000)
    una = 5000 - IN_FLIGHT - UNSENT
    keeper = _Keeper({s.tuple: [answer(s, una + 300, [(una - 1, una)])]})
    real_peek = keeper.peek
    # the peer's answer exists only once a second probe has left
    monkeypatch.setattr(keeper, "peek",
                        lambda conns: real_peek(conns) if len(keeper.sent) > 1 else [[] for _ in conns])
    monkeypatch.setattr("sockrepair.move.ask.RETRY_AFTER", 0.0)
    _probes_into(keeper, monkeypatch)
    asked = ask_peers(keeper, [s], "/proc/thread-self/ns/net")  # type: ignore[arg-type]
    assert len(keeper.sent) == 2 and keeper.sent[0] == keeper.sent[1]
    assert asked.answered == [True] and asked.states[0].send_queue == SENT[300:]


def test_a_peer_that_never_answers_is_asked_twice_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    # every answer is a duplicate ACK the restored socket receives: a peer without SACK counts three as a loss
    s = state(send_seq=5000)
    keeper = _Keeper({})
    monkeypatch.setattr("sockrepair.move.ask.RETRY_AFTER", 0.0)
    monkeypatch.setattr("sockrepair.move.ask.ANSWER_TIMEOUT", 0.05)
    _probes_into(keeper, monkeypatch)
    asked = ask_peers(keeper, [s], "/proc/thread-self/ns/net")  # type: ignore[arg-type]
    assert len(keeper.sent) == 2
    assert asked.answered == [False] and asked.states == [s]


def _in_flight(n: int, port: int, unsent: int = 0, timestamps: bool = False) -> ConnectionState:
    s = state(send_seq=5000, conn=ConnTuple(socket.AF_INET, "10.0.0.1", port, "10.0.0.2", 80))
    return dataclasses.replace(s, send_queue=SENT[:n], unsent_len=unsent,
                               options=dataclasses.replace(s.options, timestamps=timestamps))


def test_only_peers_whose_in_flight_bytes_need_more_than_one_segment_are_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # one segment leaves again at once without an answer (the restore's one-burst rule): asking costs a round trip
    states = [_in_flight(1460, 1), _in_flight(1461, 2), _in_flight(100, 3, unsent=100),
              _in_flight(1460, 4, timestamps=True), _in_flight(1448, 5, timestamps=True)]
    keeper = _Keeper({})
    monkeypatch.setattr("sockrepair.move.ask.ANSWER_TIMEOUT", 0.0)
    _probes_into(keeper, monkeypatch)
    asked = ask_peers(keeper, states, "/proc/thread-self/ns/net", same_place=True)  # type: ignore[arg-type]
    assert sorted({struct.unpack_from(">H", p, 20)[0] for p in keeper.sent}) == [2, 3, 4]
    assert asked.states == states and asked.answered == [False] * 5


def test_no_peer_is_probed_when_every_in_flight_fits_one_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    states = [_in_flight(64, n) for n in range(1, 4)]
    keeper = _Keeper({})
    _probes_into(keeper, monkeypatch)
    asked = ask_peers(keeper, states, "/proc/thread-self/ns/net", same_place=True)  # type: ignore[arg-type]
    assert keeper.sent == [] and keeper.peeks == 0
    assert asked.states == states and asked.answered == [False] * 3


def test_moved_elsewhere_every_peer_with_bytes_in_flight_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # another host: the answer is also the sign that the network brings the peer's packets there
    states = [_in_flight(64, n) for n in range(1, 4)]
    keeper = _Keeper({})
    monkeypatch.setattr("sockrepair.move.ask.ANSWER_TIMEOUT", 0.0)
    _probes_into(keeper, monkeypatch)
    ask_peers(keeper, states, "/proc/thread-self/ns/net")  # type: ignore[arg-type]
    assert sorted({struct.unpack_from(">H", p, 20)[0] for p in keeper.sent}) == [1, 2, 3]
