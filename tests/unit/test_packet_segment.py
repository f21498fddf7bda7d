"""packet.tcp_segment: the segment restore sends to make a restored socket acknowledge (engine/_restore.py
_ask_for_ack) is, byte for byte, what with_checksums(tcp_packet(...)) gives: header fields, lengths, checksums."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockrepair.packet import tcp_packet, tcp_segment, with_checksums

ADDRESSES = [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
    (socket.AF_INET, "10.77.0.2", "192.168.255.1"),
    (socket.AF_INET, "0.0.0.0", "0.0.0.0"),
    (socket.AF_INET6, "::1", "::1"),
    (socket.AF_INET6, "fd77::2", "2001:db8:ffff::ffff"),
]


@pytest.mark.parametrize(("family", "src", "dst"), ADDRESSES)
@given(sport=st.integers(0, 0xFFFF), dport=st.integers(0, 0xFFFF), seq=st.integers(0, 2**33),
       ack=st.integers(0, 2**33), flags=st.integers(0, 0xFF), window=st.integers(0, 2**20))
def test_tcp_segment_is_tcp_packet_with_its_checksums(family: int, src: str, dst: str, sport: int, dport: int,
                                                        seq: int, ack: int, flags: int, window: int) -> None:
    made = tcp_segment(family, src, sport, dst, dport, seq, ack, flags, window)
    assert made == with_checksums(tcp_packet(family, src, sport, dst, dport, seq, ack, flags, window))


def test_tcp_segment_fields() -> None:
    made = tcp_segment(socket.AF_INET, "10.0.0.2", 80, "10.0.0.1", 40000, 2**32 + 5, 2**32 - 1, 0x10, 70000)
    assert len(made) == 40 and made[0] == 0x45 and struct.unpack_from(">H", made, 2)[0] == 40
    assert made[12:16] == socket.inet_aton("10.0.0.2") and made[16:20] == socket.inet_aton("10.0.0.1")
    sport, dport, seq, ack, offset, flags, window = struct.unpack_from(">HHIIBBH", made, 20)
    # sequence numbers mod 2**32; the window field capped at 0xFFFF (the caller scales it)
    assert (sport, dport, seq, ack, offset, flags, window) == (80, 40000, 5, 2**32 - 1, 5 << 4, 0x10, 0xFFFF)
    # RFC 1071: summed with its checksum, the IPv4 header and the pseudo-header with the segment sum to 0xFFFF
    assert _ones_complement_sum(made[:20]) == 0xFFFF
    assert _ones_complement_sum(made[12:20] + struct.pack(">BBH", 0, socket.IPPROTO_TCP, 20) + made[20:]) == 0xFFFF


def _ones_complement_sum(data: bytes) -> int:
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total
