"""One IPv4 or IPv6 TCP packet as bytes: which connection it belongs to, its lengths, and its checksums made right
(RFC 791 header checksum, RFC 793 / RFC 8200 section 8.1 TCP checksum over the pseudo-header). Used by the lock's
recorder and injector and by the packets.img format; no extension headers, no IP options beyond IHL."""

from __future__ import annotations

import socket
import struct

from sockrepair.state import ConnTuple


def packet_tuple(packet: bytes | memoryview) -> ConnTuple | None:
    """The connection a TCP packet from a peer belongs to, as the receiving socket names it (local = destination),
    or None for anything else (not TCP, IPv6 extension headers, too short)."""
    if len(packet) < 1:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != socket.IPPROTO_TCP or len(packet) < ihl + 4:
            return None
        sport, dport = struct.unpack_from(">HH", packet, ihl)
        return ConnTuple(socket.AF_INET, socket.inet_ntop(socket.AF_INET, packet[16:20]), dport,
                         socket.inet_ntop(socket.AF_INET, packet[12:16]), sport)
    if version == 6 and len(packet) >= 44 and packet[6] == socket.IPPROTO_TCP:
        sport, dport = struct.unpack_from(">HH", packet, 40)
        return ConnTuple(socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, packet[24:40]), dport,
                         socket.inet_ntop(socket.AF_INET6, packet[8:24]), sport)
    return None


def tcp_packet(family: int, src: str, sport: int, dst: str, dport: int, seq: int, ack: int, flags: int,
               window: int, payload: bytes = b"") -> bytes:
    """An IPv4 or IPv6 TCP packet from `src`:`sport` to `dst`:`dport` (addresses as inet_pton takes them): no IP or
    TCP options, TTL (hop limit) 64, IPv4 DF; `seq` and `ack` mod 2**32, `window` the header's 16-bit field (capped
    at 0xFFFF: the caller scales it). Its checksums are left 0: lock.inject.Injector.send, which sends every
    packet, computes them (with_checksums)."""
    tcp = struct.pack(">HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                      min(window, 0xFFFF), 0, 0) + payload
    s, d = socket.inet_pton(family, src), socket.inet_pton(family, dst)
    if family == socket.AF_INET:
        return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, s, d) + tcp
    return struct.pack(">IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64, s, d) + tcp


_TCP_HEADER = struct.Struct(">HHIIBBHHH")
_IPV4_HEADER = struct.Struct(">BBHHHBBH4s4s")
_IPV6_HEADER = struct.Struct(">IHBB16s16s")


def tcp_segment(family: int, src: str, sport: int, dst: str, dport: int, seq: int, ack: int, flags: int,
                window: int) -> bytes:
    """tcp_packet() without payload and with its checksums made right: the bytes with_checksums(tcp_packet(...))
    gives, computed from the fields rather than parsed back (restore sends one per connection, inside the
    downtime). The ones' complement sums of the parts add up (RFC 1071): the addresses count in both checksums."""
    s, d = socket.inet_pton(family, src), socket.inet_pton(family, dst)
    seq &= 0xFFFFFFFF
    ack &= 0xFFFFFFFF
    window = min(window, 0xFFFF)
    addresses = _sum16(s + d)
    header = _TCP_HEADER.pack(sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    checksum = ~_fold(addresses + _PSEUDO_REST + _sum16(header)) & 0xFFFF
    tcp = _TCP_HEADER.pack(sport, dport, seq, ack, 5 << 4, flags, window, checksum, 0)
    if family == socket.AF_INET:
        ip_checksum = ~_fold(addresses + _IPV4_REST) & 0xFFFF
        return _IPV4_HEADER.pack(0x45, 0, 40, 0, 0x4000, 64, socket.IPPROTO_TCP, ip_checksum, s, d) + tcp
    return _IPV6_HEADER.pack(6 << 28, 20, socket.IPPROTO_TCP, 64, s, d) + tcp


def packet_length(packet: bytes) -> int:
    if packet[0] >> 4 == 4:
        return int(struct.unpack_from(">H", packet, 2)[0])
    return 40 + int(struct.unpack_from(">H", packet, 4)[0])


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes | bytearray | memoryview) -> int:
    """A number whose _fold() is the ones' complement sum of `data`'s big-endian 16-bit words (an odd last byte
    padded with 0): 2**16 is 1 modulo 0xFFFF, so the words' sum is the whole number's remainder, and only data of
    zeros sums to 0 (else to 0xFFFF, never to 0). One big-integer operation instead of a tuple of words."""
    n = int.from_bytes(data, "big") << (8 * (len(data) & 1))
    return n % 0xFFFF or (0xFFFF if n else 0)


def with_checksums(packet: bytes) -> bytes:
    """`packet` (an IPv4 or IPv6 TCP packet without extension headers) with its IPv4 header checksum and its TCP
    checksum (RFC 793, RFC 8200 section 8.1 for the IPv6 pseudo-header) computed again. Raises ValueError when the
    packet is not such a packet or its lengths do not add up."""
    data = bytearray(packet)
    version = data[0] >> 4 if data else 0
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        total = struct.unpack_from(">H", data, 2)[0]
        if ihl < 20 or total != len(data) or data[9] != socket.IPPROTO_TCP or total < ihl + 20:
            raise ValueError("not a whole IPv4 TCP packet")
        struct.pack_into(">H", data, 10, 0)
        struct.pack_into(">H", data, 10, ~_fold(_sum16(data[:ihl])) & 0xFFFF)
        segment_at = ihl
        pseudo = bytes(data[12:20]) + struct.pack(">BBH", 0, socket.IPPROTO_TCP, total - ihl)
    elif version == 6:
        payload_len = struct.unpack_from(">H", data, 4)[0]
        if data[6] != socket.IPPROTO_TCP or 40 + payload_len != len(data) or payload_len < 20:
            raise ValueError("not a whole IPv6 TCP packet without extension headers")
        segment_at = 40
        pseudo = bytes(data[8:40]) + struct.pack(">IxxxB", payload_len, socket.IPPROTO_TCP)
    else:
        raise ValueError(f"not an IP packet (version {version})")
    struct.pack_into(">H", data, segment_at + 16, 0)
    checksum = ~_fold(_sum16(pseudo) + _sum16(memoryview(data)[segment_at:])) & 0xFFFF
    struct.pack_into(">H", data, segment_at + 16, checksum)
    return bytes(data)


# What tcp_segment sums besides the addresses: the pseudo-header's protocol and TCP length (20, the same words in
# IPv4's and IPv6's), and the rest of tcp_segment's IPv4 header.
_PSEUDO_REST = _sum16(struct.pack(">HH", socket.IPPROTO_TCP, 20))
_IPV4_REST = _sum16(_IPV4_HEADER.pack(0x45, 0, 40, 0, 0x4000, 64, socket.IPPROTO_TCP, 0, bytes(4), bytes(4)))
