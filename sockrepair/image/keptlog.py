"""kept.img: the journal the keeper (sockrepair.move.keepd) appends while the connections of a dump wait, locked,
for their restore; `sockrepair restore -D` (and `sockrepair criu restore`) deliver what it holds. Written record by
record, each with its own CRC-32, so that a keeper killed at any instant leaves every record it finished readable:

    header: "SKKL"  u16 version = 1  u32 crc32(magic, version)
    record: u8 kind  u32 length  length bytes  u32 crc32(kind, length, bytes)

all big-endian. Kinds: PACKET (one whole IPv4/IPv6 TCP packet, peer to us, in the order the lock saw them), COUNTS
(u32 over_cap, u32 lost, u32 truncated: the keeper's totals so far, the last one counts) and END (the reason the
keeper stopped, UTF-8; nothing may follow it). A record cut short at the end of the file is what a keeper killed in
the middle of its write leaves (`torn`); a record whose CRC does not match, or a packet that is not a whole TCP
packet, is damage: ImageError naming the record."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from sockrepair.errors import ImageError
from sockrepair.packet import packet_tuple, with_checksums

NAME = "kept.img"
MAGIC = b"SKKL"
VERSION = 1
PACKET, COUNTS, END = 1, 2, 3
# the keeper stops keeping at the recorder's caps (256 MiB in all), plus the records' framing
MAX_FILE = 512 << 20

_HEAD = struct.Struct(">4sH")
_RECORD = struct.Struct(">BI")
_CRC = struct.Struct(">I")
_COUNTS = struct.Struct(">III")


def header() -> bytes:
    """The first bytes of a kept.img."""
    head = _HEAD.pack(MAGIC, VERSION)
    return head + _CRC.pack(zlib.crc32(head))


def record(kind: int, payload: bytes) -> bytes:
    """One record's bytes, to be appended with a single write(2)."""
    body = _RECORD.pack(kind, len(payload)) + payload
    return body + _CRC.pack(zlib.crc32(body))


def counts_record(over_cap: int, lost: int, truncated: int) -> bytes:
    return record(COUNTS, _COUNTS.pack(over_cap & 0xFFFFFFFF, lost & 0xFFFFFFFF, truncated & 0xFFFFFFFF))


@dataclass
class KeptLog:
    """A kept.img read: `packets` in order; the keeper's last counts of packets it could not keep (`over_cap`,
    `lost`, `truncated`); `end` the reason it stopped (None: it never wrote one, killed or still running); `torn`
    the bytes of a record cut short at the end."""

    packets: list[bytes] = field(default_factory=list)
    over_cap: int = 0
    lost: int = 0
    truncated: int = 0
    end: str | None = None
    torn: int = 0

    @property
    def fell_back(self) -> int:
        return self.over_cap + self.lost + self.truncated


def decode_keptlog(data: bytes, path: str = NAME) -> KeptLog:
    """The records of a kept.img, checked. Raises ImageError (`.path`, `.offset`, `.field` such as "records[3]")
    for a bad header, a record whose CRC does not match, an unknown kind, anything after END, or a packet that is
    not a whole TCP packet. A record cut short at the end is not an error here: `torn` says how many bytes it has."""
    if len(data) > MAX_FILE:
        raise ImageError(f"{path}: {len(data)} bytes, more than a keeper keeps ({MAX_FILE})", path=path)
    size = _HEAD.size + _CRC.size
    if len(data) < size or data[:size] != header():
        raise ImageError(f"{path}: not a {NAME} (bad header)", path=path, offset=0)
    log = KeptLog()
    pos, n = size, 0
    while pos < len(data):
        where = f"records[{n}]"
        if log.end is not None:
            raise ImageError(f"{path}: record {n} after the end record", path=path, offset=pos, field=where)
        if pos + _RECORD.size > len(data):
            log.torn = len(data) - pos
            break
        kind, length = _RECORD.unpack_from(data, pos)
        end = pos + _RECORD.size + length + _CRC.size
        if end > len(data):
            log.torn = len(data) - pos
            break
        body = data[pos : end - _CRC.size]
        if zlib.crc32(body) != _CRC.unpack_from(data, end - _CRC.size)[0]:
            raise ImageError(f"{path}: record {n} is damaged (CRC mismatch)", path=path, offset=pos, field=where)
        payload = bytes(body[_RECORD.size :])
        if kind == PACKET:
            try:
                with_checksums(payload)
            except ValueError as exc:
                raise ImageError(f"{path}: record {n}: {exc}", path=path, offset=pos, field=where) from None
            if packet_tuple(payload) is None:
                raise ImageError(f"{path}: record {n} is not a TCP packet", path=path, offset=pos, field=where)
            log.packets.append(payload)
        elif kind == COUNTS and length == _COUNTS.size:
            log.over_cap, log.lost, log.truncated = _COUNTS.unpack(payload)
        elif kind == END:
            log.end = payload.decode("utf-8", "replace")
        else:
            raise ImageError(f"{path}: record {n} has unknown kind {kind} (length {length})", path=path,
                             offset=pos, field=where)
        pos, n = end, n + 1
    return log
