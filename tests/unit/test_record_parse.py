"""The recorder's reading of nfnetlink_log messages (sockrepair.lock.record.Recorder._parse): the copies kept per
connection in arrival order, the gaps in NFULA_SEQ counted as lost, truncated copies and copies over a cap counted,
and a malformed attribute refused. Messages are built here as the kernel lays them out (nfnetlink_log.c
__build_packet_message), so no namespace or nft table is needed."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from sockrepair.errors import LockError
from sockrepair.lock import nfconst as c
from sockrepair.lock.record import _ULOG_PACKET, KeepCaps, Recorder
from sockrepair.packet import tcp_packet
from sockrepair.state import ConnTuple

NFULA_PACKET_HDR, NFULA_MARK, NFULA_IFINDEX_INDEV = 1, 2, 4  # attributes the recorder skips


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(packet: bytes | None, seq: int | None) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + _attr(NFULA_PACKET_HDR, b"\x08\x00\x03\x00")
    body += _attr(NFULA_MARK, b"\0\0\0\0") + _attr(NFULA_IFINDEX_INDEV, b"\0\0\0\x02")
    if packet is not None:
        body += _attr(c.NFULA_PAYLOAD, packet)
    if seq is not None:
        body += _attr(c.NFULA_SEQ, struct.pack(">I", seq))
    return struct.pack("=IHHII", 16 + len(body), _ULOG_PACKET, 0, 0, 0) + body


def _packet(port: int, payload: bytes) -> bytes:
    return tcp_packet(socket.AF_INET, "10.0.0.2", port, "10.0.0.1", 8000, 1000, 2000, 0x18, 500, payload)


def _conn(port: int) -> ConnTuple:
    return ConnTuple(socket.AF_INET, "10.0.0.1", 8000, "10.0.0.2", port)


class _Unbound(Recorder):
    """A Recorder with no netlink socket bound (one end of an empty socket pair stands in, so that drain() finds
    nothing to read): only its parsing is used."""

    def __init__(self, caps: KeepCaps = KeepCaps()) -> None:
        self.caps = caps
        self._sock, self._other = socket.socketpair()
        self._start(None)

    def close(self) -> None:
        super().close()
        self._other.close()


@pytest.fixture
def recorder() -> Iterator[_Unbound]:
    made = _Unbound()
    yield made
    made.close()


def test_copies_are_kept_per_connection_in_order_and_gaps_counted_lost(recorder: _Unbound) -> None:
    a1, b1, a2 = _packet(40001, b"first"), _packet(40002, b"other"), _packet(40001, b"second")
    # two messages in one read, as the kernel batches them; seq 7 never came
    recorder._parse(memoryview(_message(a1, 5) + _message(b1, 6)))
    recorder._parse(memoryview(_message(a2, 8)))
    assert recorder.peek([_conn(40001), _conn(40002), _conn(40003)]) == [[a1, a2], [b1], []]
    held = recorder.take([_conn(40001)])
    assert held.packets == [a1, a2] and held.lost == 1 and held.truncated == 0 and held.over_cap == 0
    assert recorder.next_seq == 9
    assert recorder.take([_conn(40001), _conn(40002)]).packets == [b1]
    assert recorder.pending([_conn(40001), _conn(40002)]) == 0


def test_truncated_and_over_cap_copies_are_counted_not_kept() -> None:
    recorder = _Unbound(KeepCaps(packets_per_connection=1))
    try:
        whole, cut = _packet(40001, b"x" * 40), _packet(40002, b"y" * 40)[:-10]
        recorder._parse(memoryview(_message(whole, 1) + _message(cut, 2) + _message(whole, 3)))
        held = recorder.take([_conn(40001), _conn(40002)])
        assert held.packets == [whole] and held.truncated == 1 and held.over_cap == 1 and held.lost == 0
    finally:
        recorder.close()


@pytest.mark.parametrize(("caps", "kept_ports"), [
    (KeepCaps(bytes_per_connection=150), [40001, 40002, 40003]),  # the second 80-byte copy of 40001 goes past 150
    (KeepCaps(total_packets=2), [40001, 40002]),
    (KeepCaps(total_bytes=200), [40001, 40002]),
])
def test_each_cap_refuses_the_copy_that_goes_past_it(caps: KeepCaps, kept_ports: list[int]) -> None:
    recorder = _Unbound(caps)
    try:
        a1, b1, c1, a2 = (_packet(port, b"x" * 40) for port in (40001, 40002, 40003, 40001))
        assert len(a1) == 80
        recorder._parse(memoryview(b"".join(_message(p, n) for n, p in enumerate([a1, b1, c1, a2], 1))))
        held = recorder.take([_conn(40001), _conn(40002), _conn(40003)])
        assert [int.from_bytes(p[20:22], "big") for p in held.packets] == kept_ports
        assert held.over_cap == 4 - len(kept_ports)
        # what was taken is no longer counted against the caps in all
        recorder._parse(memoryview(_message(_packet(40004, b"y" * 40), 5)))
        assert len(recorder.take([_conn(40004)]).packets) == 1
    finally:
        recorder.close()


@pytest.mark.parametrize("bad", [{"total_packets": -1}, {"bytes_per_connection": 1.5}, {"total_bytes": True}])
def test_a_cap_that_is_not_a_count_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=f"KeepCaps.{next(iter(bad))} must be an int >= 0"):
        KeepCaps(**bad)  # type: ignore[arg-type]


def test_a_message_without_payload_only_counts_its_sequence(recorder: _Unbound) -> None:
    recorder._parse(memoryview(_message(None, 1) + _message(_packet(40001, b"z"), 3)))
    held = recorder.take([_conn(40001)])
    assert len(held.packets) == 1 and held.lost == 1


def test_a_malformed_attribute_is_refused(recorder: _Unbound) -> None:
    message = bytearray(_message(_packet(40001, b"z"), 1))
    struct.pack_into("=H", message, 20, 200)  # the first attribute claims more bytes than the message holds
    with pytest.raises(LockError, match="malformed netlink attribute"):
        recorder._parse(memoryview(bytes(message)))
