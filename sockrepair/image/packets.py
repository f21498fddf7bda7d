"""packets.img: the packets that peers sent while their connections were locked, kept by the lock (lock/record.py)
and stored beside the images of `sockrepair dump`, so that `sockrepair restore -D` delivers them to the restored
sockets (lock/inject.py) instead of leaving the peers to their retransmission timeout.

The layout, defined with construct as the connection image is (same checksum rules: CRC-32 of everything before it):

    "SKPK"  u16 version = 1  u32 count  { u32 length, length bytes: one whole IPv4/IPv6 TCP packet } * count  u32 crc32

all big-endian; packets in the order the lock saw them. Every packet is checked on reading: a TCP packet whose IP
lengths match its size, so a damaged or forged file is an ImageError naming the packet, never bytes on the wire."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from construct import (
    Array,
    Checksum,
    Const,
    ConstructError,
    GreedyBytes,
    Int16ub,
    Int32ub,
    Prefixed,
    RawCopy,
    Struct,
    Terminated,
    this,
)

from sockrepair.errors import ImageError
from sockrepair.packet import packet_tuple, with_checksums

NAME = "packets.img"
MAGIC = b"SKPK"
VERSION = 1
# More than a lock keeps (lock/record.py caps it at 256 MiB): a larger file is refused before it is read.
MAX_FILE = 512 << 20

PacketsFile = Struct(
    "signed" / RawCopy(Struct(
        "magic" / Const(MAGIC),
        "version" / Const(VERSION, Int16ub),
        "count" / Int32ub,
        "packets" / Array(this.count, Prefixed(Int32ub, GreedyBytes)),
    )),
    "crc32" / Checksum(Int32ub, zlib.crc32, this.signed.data),
    Terminated,
)


def encode_packets(packets: Sequence[bytes]) -> bytes:
    """The file's bytes for `packets` (whole IP packets)."""
    return bytes(PacketsFile.build({"signed": {"value": {"count": len(packets), "packets": list(packets)}}}))


def decode_packets(data: bytes, path: str = NAME) -> list[bytes]:
    """The packets of a packets.img, checked. Raises ImageError (`.path`, `.field` such as "packets[3]") when the
    file is damaged, of another version, or holds anything but whole TCP packets."""
    if len(data) > MAX_FILE:
        raise ImageError(f"{path}: {len(data)} bytes, more than a lock keeps ({MAX_FILE})", path=path)
    try:
        parsed = PacketsFile.parse(data)
    except ConstructError as exc:
        where = getattr(exc, "path", None) or ""
        field = where.replace("(parsing) -> ", "").replace(" -> ", ".") or None
        raise ImageError(f"{path}: not a valid {NAME}: {str(exc).splitlines()[-1]}", path=path,
                         field=field) from None
    packets = [bytes(p) for p in parsed.signed.value.packets]
    for n, packet in enumerate(packets):
        try:
            with_checksums(packet)
        except ValueError as exc:
            raise ImageError(f"{path}: packet {n}: {exc}", path=path, field=f"packets[{n}]") from None
        if packet_tuple(packet) is None:
            raise ImageError(f"{path}: packet {n} is not a TCP packet", path=path, field=f"packets[{n}]")
    return packets


_TCP_FLAGS = "FSRPAUEC"


def describe(packet: bytes) -> dict[str, object]:
    """One kept packet as people read it: the connection it belongs to (local = its destination), its sequence and
    acknowledgment numbers, TCP flags ("PA" for PSH|ACK) and payload length in bytes."""
    conn = packet_tuple(packet)
    at = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    seq, ack, offset_flags = struct.unpack_from(">IIH", packet, at + 4)
    flags = "".join(name for bit, name in enumerate(_TCP_FLAGS) if offset_flags >> bit & 1)
    return {"tuple": str(conn), "seq": seq, "ack": ack, "flags": flags,
            "payload": len(packet) - at - (offset_flags >> 12) * 4}
