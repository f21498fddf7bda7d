"""Thousands of damaged images: decode raises ImageError and nothing else, agrees with the construct definition on
what is an image, and whatever it accepts re-encodes to the very same bytes."""

from __future__ import annotations

import random
import re
import socket
import struct
import zlib
from collections.abc import Callable, Iterator

import construct
import pytest
import xxhash

from sockrepair.errors import ImageError
from sockrepair.image import _codec as image
from sockrepair.image import format, layout
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)

MUTANTS_PER_BASE = 700

BASES = [
    ConnectionState(
        tuple=ConnTuple(socket.AF_INET, "192.0.2.1", 40000, "198.51.100.7", 443),
        tcp_state=1, send_seq=0xFFFFFFFF, recv_seq=0, send_queue=bytes(range(200)), unsent_len=60,
        recv_queue=b"GET / HTTP/1.1\r\n", options=TcpOptions(1460, True, True, True, 7, 7),
        window=RepairWindow(10, 20, 30, 40, 50), timestamp=123456,
        sockopts=SocketOptions(nodelay=True, keepalive=True, congestion="bbr", mark=-1, priority=-5),
    ),
    ConnectionState(
        tuple=ConnTuple(socket.AF_INET6, "2001:db8::5", 22, "2001:db8::6", 61000),
        tcp_state=8, send_seq=1, recv_seq=2, send_queue=b"", unsent_len=0, recv_queue=b"\x00" * 40,
        options=TcpOptions(1220, False, True, False, 0, 0), window=None, timestamp=0,
        sockopts=SocketOptions(bindtodevice="veth-ä", congestion="cubic", v6only=True),
    ),
    ConnectionState(
        tuple=ConnTuple(socket.AF_INET6, "::ffff:10.0.0.1", 1, "::ffff:10.0.0.2", 65535),
        tcp_state=1, send_seq=7, recv_seq=8, send_queue=b"x", unsent_len=1, recv_queue=b"",
        options=TcpOptions(65535, True, False, True, 14, 14), window=RepairWindow(0, 0, 0, 0, 0), timestamp=1,
        sockopts=SocketOptions(),
    ),
    ConnectionState(
        tuple=ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 443),
        tcp_state=7, send_seq=9, recv_seq=10, send_queue=b"", unsent_len=0, recv_queue=b"unread",
        options=TcpOptions(1460, True, True, True, 7, 7), window=RepairWindow(1, 2, 3, 4, 5), timestamp=2,
        sockopts=SocketOptions(), sk_err=32, fin_received=True,
    ),
]  # fmt: skip


# Every field an ImageError of decode may blame: the header's, the fixed-size ones of any layout, and the rest.
KNOWN_FIELDS = {
    "magic", "version", "flags", "crc32", "xxh3_64", "sockopts.bindtodevice", "sockopts.congestion", "unsent_len",
    "send_queue", "recv_queue", *(name for body in image._LAYOUTS.values() for name in body.offsets), "more_sockopts.flags",
    *(f"more_sockopts.{name}" for name in (*layout.MORE_SOCKOPT_INTS, *layout.MORE_SOCKOPT_LONGS)),
    "close.sk_err", "close.flags",
}  # fmt: skip


def length_fields(state: ConnectionState) -> list[tuple[int, str]]:
    """Where each length (and unsent_len) of `state`'s image lies, with its struct format."""
    version = 4 if state.tuple.family == socket.AF_INET else 6
    dev = image.HEADER_SIZE + image._LAYOUTS[version, state.window is not None].body.size
    cong = dev + 1 + len(state.sockopts.bindtodevice.encode())
    unsent = cong + 1 + len(state.sockopts.congestion.encode())
    recv = unsent + 8 + len(state.send_queue)
    return [(8, ">I"), (dev, ">B"), (cong, ">B"), (unsent, ">I"), (unsent + 4, ">I"), (recv, ">I")]


def reseal(data: bytearray, version: int) -> None:
    """The trailer of a `version` image made valid again for the bytes before it."""
    if version >= layout.FIRST_XXH3:
        struct.pack_into(">Q", data, len(data) - 8, xxhash.xxh3_64_intdigest(bytes(data[:-8])))
    else:
        struct.pack_into(">I", data, len(data) - 4, zlib.crc32(data[:-4]))


def mutants(state: ConnectionState, rng: random.Random, version: int) -> Iterator[tuple[str, bytes]]:
    good = image.encode(state, version)
    trailer = layout.CHECKSUM_SIZE[version]
    lengths = length_fields(state)

    def flip(data: bytearray) -> None:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)

    def truncate(data: bytearray) -> None:
        del data[rng.randrange(len(data)) :]

    def insert(data: bytearray) -> None:
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 8))

    def delete(data: bytearray) -> None:
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 8)]

    def overwrite(data: bytearray) -> None:
        at = rng.randrange(len(data))
        data[at : at + 4] = rng.randbytes(4)

    def tamper_length(data: bytearray) -> None:
        offset, fmt = rng.choice(lengths)
        top = 0xFF if fmt == ">B" else 0xFFFFFFFF
        (old,) = struct.unpack_from(fmt, data, offset)
        value = rng.choice([0, 1, old - 1, old + 1, old + rng.randint(2, 300), top, top // 2 + 1, rng.randint(0, top)])
        struct.pack_into(fmt, data, offset, max(0, min(value, top)))

    kinds: list[Callable[[bytearray], None]] = [flip, truncate, insert, delete, overwrite, tamper_length]
    for _ in range(MUTANTS_PER_BASE):
        kind = rng.choice(kinds)
        data = bytearray(good)
        kind(data)
        yield kind.__name__, bytes(data)
        # The same damage behind a header and checksum made consistent again, so that it reaches the body parser.
        if len(data) >= image.HEADER_SIZE + trailer:
            if kind is not tamper_length or rng.random() < 0.5:
                struct.pack_into(">I", data, 8, len(data) - image.HEADER_SIZE - trailer)
            reseal(data, version)
            yield kind.__name__ + "+resealed", bytes(data)


def state_from_container(c: construct.Container) -> ConnectionState:
    """The state the construct definition reads from an image: the reference decode() is held to."""
    body = c.signed.value.body
    t = body.tuple
    family = socket.AF_INET if t.ip_version == 4 else socket.AF_INET6
    so, more = body.sockopts, body.more_sockopts
    more_values = {} if more is None else {
        **{name: more.flags[name] for name in layout.MORE_SOCKOPT_FLAGS},
        **{name: more[name] for name in (*layout.MORE_SOCKOPT_INTS, *layout.MORE_SOCKOPT_LONGS)},
    }  # fmt: skip
    return ConnectionState(
        tuple=ConnTuple(family, socket.inet_ntop(family, t.local_addr), t.local_port,
                        socket.inet_ntop(family, t.remote_addr), t.remote_port),
        tcp_state=body.tcp_state,
        send_seq=body.send_seq,
        recv_seq=body.recv_seq,
        send_queue=body.send_queue,
        unsent_len=body.unsent_len,
        recv_queue=body.recv_queue,
        options=TcpOptions(body.options.mss, body.options.flags.sack, body.options.flags.timestamps,
                           body.options.flags.wscale, body.options.snd_wscale, body.options.rcv_wscale),
        window=None if body.window is None else RepairWindow(*(body.window[n] for n in layout.WINDOW_FIELDS)),
        timestamp=body.timestamp,
        sockopts=SocketOptions(
            **{name: so.flags[name] for name in layout.SOCKOPT_FLAGS},
            **{name: so[name] for name in layout.SOCKOPT_INTS},
            bindtodevice=so.bindtodevice,
            congestion=so.congestion,
            **more_values,
        ),
        sk_err=0 if body.close is None else body.close.sk_err,
        fin_received=body.close is not None and body.close.flags.fin_received,
    )  # fmt: skip


def reference(data: bytes) -> ConnectionState | None:
    try:
        return state_from_container(format.ConnectionImage.parse(data))
    except construct.ConstructError:
        return None


# every base at every version that can hold it (the CLOSE record is version 3's)
CASES = [(index, version) for index, base in enumerate(BASES) for version in layout.VERSIONS
         if version >= 3 or not (base.sk_err or base.fin_received)]


@pytest.mark.parametrize(("index", "version"), CASES)
def test_mutated_images(index: int, version: int) -> None:
    rng = random.Random(20260 + index + 100 * version)
    seen: dict[str, int] = {}
    accepted = 0
    for kind, data in mutants(BASES[index], rng, version):
        try:
            state = image.decode(data)
        except ImageError as exc:
            match = re.fullmatch(r"bad connection image at byte (\d+): .+", str(exc))
            assert match is not None, (kind, str(exc))
            assert 0 <= int(match.group(1)) <= len(data), (kind, str(exc))
            assert exc.offset == int(match.group(1)), (kind, str(exc))
            assert exc.field is None or exc.field in KNOWN_FIELDS, (kind, exc.field, str(exc))
            assert reference(data) is None, (kind, data.hex(), str(exc))
            reason = str(exc).split(": ", 1)[1].split(" ")[0]
            seen[reason] = seen.get(reason, 0) + 1
        else:
            accepted += 1
            assert image.encode(state, struct.unpack_from(">H", data, 4)[0]) == data, (kind, data.hex())
            assert reference(data) == state, (kind, data.hex())
    # The damage must have reached past the checksum into the body checks, or this test proves little.
    assert seen.get("checksum", 0) > 100, seen
    assert {"truncated:", "the", "unsent_len", "congestion", "invalid"} <= seen.keys(), seen
    assert accepted > 100


def test_random_garbage() -> None:
    rng = random.Random(7)
    header = layout.MAGIC + struct.pack(">HH", layout.VERSION, 0)
    for n in range(2000):
        data = rng.randbytes(rng.randrange(300))
        if n % 2:
            data = header + struct.pack(">I", max(len(data) - 8, 0)) + data
            data = data[:-8] + struct.pack(">Q", xxhash.xxh3_64_intdigest(data[:-8]))
        try:
            state = image.decode(data)
        except ImageError:
            assert reference(data) is None
        else:
            assert state.to_bytes() == data
