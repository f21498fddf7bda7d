"""The binary connection image and its JSON view: round trips, agreement with the construct definition, and one
test per kind of malformed input."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import tracemalloc
import zlib
from typing import Any

import construct
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockrepair.errors import ImageError
from sockrepair.image import _codec as image
from sockrepair.image import format, jsonview, layout
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)

U32 = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
SHORT_TEXT = st.text(max_size=layout.MAX_NAME).filter(lambda s: len(s.encode()) <= layout.MAX_NAME)


def _addresses(family: int, size: int, prefix: bytes = b"") -> st.SearchStrategy[str]:
    # inet_ntop spelling, as getsockname() reports addresses and decode() returns them.
    raw = st.binary(min_size=size - len(prefix), max_size=size - len(prefix))
    return raw.map(lambda b: socket.inet_ntop(family, prefix + b))


@st.composite
def conn_tuples(draw: st.DrawFn) -> ConnTuple:
    kind = draw(st.sampled_from(["ipv4", "ipv6", "v4-mapped"]))
    if kind == "ipv4":
        family, addrs = socket.AF_INET, _addresses(socket.AF_INET, 4)
    elif kind == "ipv6":
        family, addrs = socket.AF_INET6, _addresses(socket.AF_INET6, 16)
    else:
        family, addrs = socket.AF_INET6, _addresses(socket.AF_INET6, 16, bytes(10) + b"\xff\xff")
    port = st.integers(1, 65535)
    return ConnTuple(family, draw(addrs), draw(port), draw(addrs), draw(port))


@st.composite
def states(draw: st.DrawFn) -> ConnectionState:
    send = draw(st.binary(max_size=2048))
    values: dict[str, Any] = {name: draw(st.booleans()) for name in layout.SOCKOPT_FLAGS}
    values |= {name: draw(I32) for name in layout.SOCKOPT_INTS}
    values |= {name: draw(st.booleans()) for name in layout.MORE_SOCKOPT_FLAGS}
    values |= {name: draw(I32) for name in layout.MORE_SOCKOPT_INTS}
    values |= {name: draw(st.integers(0, 2**63 - 1)) for name in layout.MORE_SOCKOPT_LONGS}
    sockopts = SocketOptions(**values, bindtodevice=draw(SHORT_TEXT), congestion=draw(SHORT_TEXT))
    wscale = st.integers(0, layout.MAX_WSCALE)
    tcp_state = draw(st.sampled_from(sorted(layout.VALID_TCP_STATES)))
    closed = tcp_state == layout.CLOSE_STATE
    return ConnectionState(
        tuple=draw(conn_tuples()),
        tcp_state=tcp_state,
        send_seq=draw(U32),
        recv_seq=draw(U32),
        send_queue=send,
        unsent_len=draw(st.integers(0, len(send))),
        recv_queue=draw(st.binary(max_size=2048)),
        options=TcpOptions(draw(st.integers(0, 65535)), draw(st.booleans()), draw(st.booleans()),
                           draw(st.booleans()), draw(wscale), draw(wscale)),
        window=draw(st.none() | st.builds(RepairWindow, U32, U32, U32, U32, U32)),
        timestamp=draw(U32),
        sockopts=sockopts,
        sk_err=draw(st.integers(0, layout.MAX_ERRNO)) if closed else 0,
        fin_received=draw(st.booleans()) if closed else False,
    )  # fmt: skip


def base_state(**changes: object) -> ConnectionState:
    """IPv4 with a window, "cubic", 11 bytes queued to send (5 never sent) and 3 received: a 153-byte image whose
    offsets (docs/image-format.md) the malformed-input tests below use."""
    state = ConnectionState(
        tuple=ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 443),
        tcp_state=1,
        send_seq=0xFFFFFFF0,
        recv_seq=12345,
        send_queue=b"hello world",
        unsent_len=5,
        recv_queue=b"abc",
        options=TcpOptions(1460, True, True, True, 7, 9),
        window=RepairWindow(1, 2, 3, 4, 5),
        timestamp=777,
        sockopts=SocketOptions(nodelay=True, congestion="cubic"),
    )
    return state.replace(**changes)


MORE_SIZE = 1 + 4 * len(layout.MORE_SOCKOPT_INTS) + 8 * len(layout.MORE_SOCKOPT_LONGS)


def v1_image(state: ConnectionState | None = None) -> bytes:
    """The version 1 image of `state` (base_state() by default), as sockrepair before version 2 wrote it: version
    2's without the trailing record. The malformed-input tests below damage these (the offsets are the same in
    every version up to the receive queue), so reading version 1 stays held to every check."""
    data = image.encode(state or base_state(), version=2)
    (body_len,) = struct.unpack_from(">I", data, 8)
    out = data[:4] + struct.pack(">HHI", 1, struct.unpack_from(">H", data, 6)[0], body_len - MORE_SIZE)
    return reseal(out + data[12 : -4 - MORE_SIZE] + b"\0\0\0\0")


def container_of(state: ConnectionState) -> dict:
    """What the construct definition builds `state` from."""
    t, so = state.tuple, state.sockopts
    body = {
        "tuple": {
            "ip_version": 4 if t.family == socket.AF_INET else 6,
            "local_port": t.local_port,
            "remote_port": t.remote_port,
            "local_addr": socket.inet_pton(t.family, t.local_addr),
            "remote_addr": socket.inet_pton(t.family, t.remote_addr),
        },
        "tcp_state": state.tcp_state,
        "send_seq": state.send_seq,
        "recv_seq": state.recv_seq,
        "timestamp": state.timestamp,
        "options": {
            "mss": state.options.mss,
            "flags": {"wscale": state.options.wscale, "timestamps": state.options.timestamps,
                      "sack": state.options.sack},
            "snd_wscale": state.options.snd_wscale,
            "rcv_wscale": state.options.rcv_wscale,
        },
        "window": None if state.window is None else dataclasses.asdict(state.window),
        "sockopts": {
            "flags": {name: getattr(so, name) for name in layout.SOCKOPT_FLAGS},
            **{name: getattr(so, name) for name in layout.SOCKOPT_INTS},
            "bindtodevice": so.bindtodevice,
            "congestion": so.congestion,
        },
        "unsent_len": state.unsent_len,
        "send_queue": state.send_queue,
        "recv_queue": state.recv_queue,
        "more_sockopts": {
            "flags": {name: getattr(so, name) for name in layout.MORE_SOCKOPT_FLAGS},
            **{name: getattr(so, name) for name in (*layout.MORE_SOCKOPT_INTS, *layout.MORE_SOCKOPT_LONGS)},
        },
        "close": {"sk_err": state.sk_err, "flags": {"fin_received": state.fin_received}}
        if state.sk_err or state.fin_received else None,
    }  # fmt: skip
    return {"signed": {"value": {"body": body}}}


def reseal(data: bytes) -> bytes:
    """`data` with its trailer (CRC-32, or XXH3-64 from version 3 on, as its header says) replaced by a valid
    checksum of the rest, so the body parser sees it."""
    if struct.unpack_from(">H", data, 4)[0] >= layout.FIRST_XXH3:
        return data[:-8] + struct.pack(">Q", xxhash.xxh3_64_intdigest(data[:-8]))
    return data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """`data` with a field rewritten and the checksum made valid again."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return reseal(bytes(out))


def rejects(data: object, offset: int, *words: str) -> str:
    with pytest.raises(ImageError) as err:
        image.decode(data)  # type: ignore[arg-type]
    message = str(err.value)
    assert f"at byte {offset}:" in message, message
    assert err.value.offset == offset, message
    for word in words:
        assert word in message, message
    return message


# ---- round trips and agreement with the construct definition ------------------------------------------------------


@given(states())
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(state: ConnectionState) -> None:
    data = state.to_bytes()
    assert ConnectionState.from_bytes(data) == state
    assert image.decode(bytearray(data)) == state
    assert image.decode(memoryview(data)) == state


@given(states())
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_fast_codec_builds_what_construct_builds(state: ConnectionState) -> None:
    data = image.encode(state)
    assert data == format.ConnectionImage.build(container_of(state))
    assert format.ConnectionImage.parse(data).signed.value.body.unsent_len == state.unsent_len


@pytest.mark.parametrize(
    "tuple_",
    [
        ConnTuple(socket.AF_INET, "127.0.0.1", 1, "192.168.255.254", 65535),
        ConnTuple(socket.AF_INET6, "2001:db8::1", 8080, "fe80::1:2:3:4", 22),
        ConnTuple(socket.AF_INET6, "::ffff:10.1.2.3", 5000, "::ffff:10.1.2.4", 6000),
    ],
    ids=["ipv4", "ipv6", "v4-mapped"],
)
def test_round_trip_per_family(tuple_: ConnTuple) -> None:
    state = base_state(tuple=tuple_)
    back = ConnectionState.from_bytes(state.to_bytes())
    assert back == state
    assert back.tuple.family == tuple_.family
    assert str(back.tuple) == str(tuple_)


def test_round_trip_without_window_and_with_one_mib_queues() -> None:
    send, recv = bytes(range(256)) * 4096, b"\xa5" * (1 << 20)
    state = base_state(window=None, send_queue=send, unsent_len=1000, recv_queue=recv)
    data = state.to_bytes()
    assert len(data) == 153 + MORE_SIZE + 4 - 20 - 11 - 3 + 2 * (1 << 20)  # 4: version 3's longer checksum
    back = image.decode(data)
    assert back == state
    assert back.unsent == send[-1000:] and back.unacked == send[:-1000]


@pytest.mark.parametrize("queued", [image.SMALL_QUEUES - 1, image.SMALL_QUEUES, 3 * image.SMALL_QUEUES])
@pytest.mark.parametrize("closed", [False, True])
def test_images_checksummed_whole_or_piece_by_piece_build_as_construct_builds(queued: int, closed: bool) -> None:
    # below SMALL_QUEUES queued bytes the checksum is taken over the joined image, from there on piece by piece
    send = bytes(range(256)) * (queued // 512) + b"s" * (queued // 2 % 256)
    recv = b"\x5a" * (queued - len(send))
    changes: dict[str, Any] = {"sk_err": 104, "tcp_state": layout.CLOSE_STATE, "send_queue": b"",
                               "unsent_len": 0, "recv_queue": send + recv} if closed else {}
    state = base_state(send_queue=send, unsent_len=len(send) // 3, recv_queue=recv).replace(**changes)
    data = image.encode(state)
    assert len(state.send_queue) + len(state.recv_queue) == queued
    assert data == format.ConnectionImage.build(container_of(state))
    assert image.decode(data) == state


def test_socket_option_flags_count_by_truth_as_before() -> None:
    # a flag byte is looked up by the flags' tuple; values other than bools (2, [1], "yes", 0) still count by truth
    as_bools = base_state(sockopts=SocketOptions(nodelay=True, keepalive=True, oobinline=True, tcp_inq=False))
    loose: Any = SocketOptions(nodelay=2, keepalive=[1], oobinline="yes", tcp_inq=0)  # type: ignore[arg-type]
    assert image.encode(base_state(sockopts=loose)) == image.encode(as_bools)
    assert image.decode(image.encode(base_state(sockopts=loose))).sockopts == as_bools.sockopts

def test_layout_of_the_base_image() -> None:
    data = v1_image()
    assert len(data) == 153
    assert data[:12] == b"SKRP" + bytes.fromhex("0001 0001 00000089")  # version 1, window flag, 137-byte body
    assert data[12:17] == bytes.fromhex("04 9c40 01bb")  # IPv4, ports 40000 and 443
    assert data[17:25] == socket.inet_aton("10.0.0.1") + socket.inet_aton("10.0.0.2")
    assert data[25:30] == bytes.fromhex("01 fffffff0")  # ESTABLISHED, send_seq
    assert data[38:43] == bytes.fromhex("05b4 07 07 09")  # mss 1460, sack|timestamps|wscale, scales 7 and 9
    assert data[63] == 0x01  # nodelay
    assert data[116:123] == b"\x00\x05cubic"
    assert data[123:131] == bytes.fromhex("00000005 0000000b")
    assert data[131:149] == b"hello world" + b"\x00\x00\x00\x03abc"
    assert data[149:] == struct.pack(">I", zlib.crc32(data[:149]))


def test_version_2_appends_its_record_after_the_receive_queue() -> None:
    so = SocketOptions(nodelay=True, congestion="cubic", oobinline=True, tcp_inq=True, busy_poll=50,
                       max_pacing_rate=-1, linger2=30, window_clamp=65536, mtu_discover=2, rto_max_ms=60000,
                       rto_min_us=5000, delack_max_us=0, rcvtimeo_us=1_004_000, sndtimeo_us=2**40)
    data = image.encode(base_state(sockopts=so), version=2)
    assert MORE_SIZE == 49 and len(data) == 153 + MORE_SIZE
    assert data[:12] == b"SKRP" + bytes.fromhex("0002 0001 000000ba")  # version 2, window flag, 186-byte body
    assert data[12:149] == v1_image(base_state(sockopts=so))[12:149]  # up to the receive queue: version 1's
    assert data[149:198] == bytes.fromhex("05" "00000032 ffffffff 0000001e 00010000 00000002 0000ea60 00001388"
                                          "00000000" "00000000000f51e0 0000010000000000")
    assert data[198:] == struct.pack(">I", zlib.crc32(data[:198]))
    assert image.decode(data).sockopts == so
    assert format.ConnectionImage.parse(data).signed.value.body.more_sockopts.flags.tcp_inq


def test_version_1_images_read_with_the_new_options_left_alone() -> None:
    old = v1_image()
    back = image.decode(old)
    assert back == base_state()
    assert (back.sockopts.window_clamp, back.sockopts.mtu_discover, back.sockopts.rcvtimeo_us) == (0, -1, 0)
    assert format.ConnectionImage.parse(old).signed.value.body.more_sockopts is None
    # re-encoded, it is a version 3 image of the same state
    assert image.decode(back.to_bytes()) == back and back.to_bytes()[4:6] == b"\0\3"
    # and written as version 1 (for a host that reads only that), the very bytes of old
    assert image.encode(back, version=1) == old


def test_version_2_images_read_as_written_and_know_no_close_record() -> None:
    """Version 2 is version 3's body without the CLOSE flag, under a CRC-32: version 2 refuses the flag, on reading
    and on writing."""
    v2 = image.encode(base_state(), version=2)
    assert image.decode(v2) == base_state()
    assert format.ConnectionImage.parse(v2).signed.value.body.close is None
    closed_state = base_state(tcp_state=7, send_queue=b"", unsent_len=0, sk_err=104)
    v3 = closed_state.to_bytes()
    as_v2 = reseal(v3[:4] + b"\0\2" + v3[6:-8] + b"\0\0\0\0")
    rejects(as_v2, 6, "unknown flags 0x0003 (version 2 knows 0x0001)")
    with pytest.raises(construct.ConstructError):
        format.ConnectionImage.parse(as_v2)
    for version in (1, 2):
        with pytest.raises(ImageError, match=f"version {version} has no CLOSE record") as err:
            image.encode(closed_state, version=version)
        assert err.value.field == "version"


@pytest.mark.parametrize(("cut", "field"), [(0, "more_sockopts.flags"), (1, "more_sockopts.busy_poll"),
                                            (20, "more_sockopts.mtu_discover"), (40, "more_sockopts.rcvtimeo_us"),
                                            (48, "more_sockopts.sndtimeo_us")])
def test_version_2_record_cut_names_the_field(cut: int, field: str) -> None:
    data = image.encode(base_state(), version=2)
    body = data[12 : 149 + cut]
    with pytest.raises(ImageError) as err:
        image.decode(reseal(data[:8] + struct.pack(">I", len(body)) + body + b"\0\0\0\0"))
    assert (err.value.offset, err.value.field) == (149, field), str(err.value)


def test_version_2_unknown_option_flags() -> None:
    with pytest.raises(ImageError) as err:
        image.decode(patched(image.encode(base_state(), version=2), 149, ">B", 0x08))
    assert (err.value.offset, err.value.field) == (149, "more_sockopts.flags"), str(err.value)
    with pytest.raises(construct.ConstructError):
        format.ConnectionImage.parse(patched(image.encode(base_state(), version=2), 149, ">B", 0x08))


def test_a_closed_connection_keeps_its_error_and_fin_in_the_close_record() -> None:
    """CLOSE with a pending error or the peer's FIN: header flag bit 1 and a 3-byte record after version 2's
    (u16 sk_err, u8 flags with fin_received in bit 0); without either, the image is byte for byte what sockrepair
    wrote before the record existed."""
    plain_state = base_state(tcp_state=7, send_queue=b"", unsent_len=0)
    plain = plain_state.to_bytes()
    assert struct.unpack_from(">H", plain, 6)[0] == layout.FLAG_WINDOW
    assert plain[6:-8] == image.encode(plain_state, version=2)[6:-4]  # version 2's flags and body
    state = base_state(tcp_state=7, send_queue=b"", unsent_len=0, sk_err=32, fin_received=True)
    data = state.to_bytes()
    assert struct.unpack_from(">H", data, 6)[0] == layout.FLAG_WINDOW | layout.FLAG_CLOSE
    assert data[-11:-8] == b"\x00\x20\x01" and len(data) == len(plain) + 3
    assert ConnectionState.from_bytes(data) == state
    assert format.ConnectionImage.parse(data).signed.value.body.close.sk_err == 32
    assert ConnectionState.from_bytes(plain).sk_err == 0


@pytest.mark.parametrize(("offset", "fmt", "value", "field", "words"), [
    (2, ">B", 0x02, "close.flags", "unknown CLOSE record flags 0x02"),
    (0, ">H", 0, "close.sk_err", "an all-zero CLOSE record"),
])
def test_bad_close_records(offset: int, fmt: str, value: int, field: str, words: str) -> None:
    data = base_state(tcp_state=7, send_queue=b"", unsent_len=0, sk_err=104).to_bytes()
    bad = patched(data, len(data) - 8 - 3 + offset, fmt, value)  # the record ends before the 8-byte XXH3-64
    with pytest.raises(ImageError) as err:
        image.decode(bad)
    assert err.value.field == field and words in str(err.value), str(err.value)
    with pytest.raises(construct.ConstructError):
        format.ConnectionImage.parse(bad)


def test_close_record_only_in_close() -> None:
    data = base_state(tcp_state=7, send_queue=b"", unsent_len=0, sk_err=104).to_bytes()
    bad = patched(data, 25, ">B", 1)  # tcp_state (IPv4: body offset 13) -> ESTABLISHED
    with pytest.raises(ImageError) as err:
        image.decode(bad)
    assert err.value.field == "close.sk_err" and "a CLOSE record in state 1" in str(err.value), str(err.value)
    with pytest.raises(construct.ConstructError):
        format.ConnectionImage.parse(bad)
    with pytest.raises(ImageError) as err:
        base_state(sk_err=104).to_bytes()
    assert err.value.field == "close.sk_err", str(err.value)


def test_record_sizes_match_the_construct_definition() -> None:
    assert image.HEADER_SIZE == 12 and image.CRC_SIZE == 4
    assert format.TcpOptionsRecord.sizeof() == 5
    assert format.RepairWindowRecord.sizeof() == 20
    for (version, window), body in image._LAYOUTS.items():
        addr = 4 if version == 4 else 16
        tuple_size = 5 + 2 * addr
        fixed = tuple_size + 13 + format.TcpOptionsRecord.sizeof() + (20 if window else 0) + 1 + 4 * 13
        assert body.body.size == fixed


# ---- malformed input: one test per kind ---------------------------------------------------------------------------


def test_not_bytes() -> None:
    with pytest.raises(ImageError, match="bytes, not str"):
        image.decode("SKRP")  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"S", b"SKRP", b"SKRP\x00\x01\x00\x00\x00\x00\x00\x00\x00"])
def test_truncated_header(data: bytes) -> None:
    rejects(data, len(data), "truncated", "less than the 16")


@pytest.mark.parametrize("cut", [16, 100, 148, 152])
def test_truncated_body(cut: int) -> None:
    rejects(v1_image()[:cut], cut, "truncated", "137-byte body", f"153 bytes, not {cut}")


@pytest.mark.parametrize("data", [b"X", b"SKRQ", b"\x7fELF\x02\x01\x01\x00" * 4, b'{"version": 1}'])
def test_wrong_magic(data: bytes) -> None:
    rejects(data, 0, "not a sockrepair connection image", "want 534b5250")


def test_unsupported_version() -> None:
    data = bytearray(v1_image())
    data[4:6] = b"\x00\x04"
    rejects(bytes(data), 4, "unsupported format version 4", "reads versions 1, 2, 3")


def test_unknown_flags() -> None:
    data = bytearray(v1_image())
    data[6:8] = b"\x80\x01"
    rejects(bytes(data), 6, "unknown flags 0x8001")


def test_trailing_junk() -> None:
    rejects(v1_image() + b"\x00\x00", 153, "2 bytes of trailing junk")


@pytest.mark.parametrize("offset", [0 + 12, 20, 63, 120, 140, 148])
def test_bit_flip_fails_the_checksum(offset: int) -> None:
    data = bytearray(v1_image())
    data[offset] ^= 0x10
    rejects(bytes(data), 149, "checksum mismatch")


def test_flipped_checksum() -> None:
    data = bytearray(v1_image())
    data[-1] ^= 1
    rejects(bytes(data), 149, "checksum mismatch")


def test_absurd_body_length_allocates_nothing() -> None:
    data = patched(v1_image(), 8, ">I", 0xFFFFFFF0)
    tracemalloc.start()
    try:
        rejects(data, 153, "truncated", f"{0xFFFFFFF0}-byte body")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize(
    ("offset", "what"),
    [(127, "the send queue needs 4294967295 bytes but the body has 18 left"),
     (142, "the receive queue needs 4294967295 bytes but the body has 3 left")],
)  # fmt: skip
def test_absurd_queue_length_allocates_nothing(offset: int, what: str) -> None:
    data = patched(v1_image(), offset, ">I", 0xFFFFFFFF)
    tracemalloc.start()
    try:
        rejects(data, offset + 4, what)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_body_shorter_than_its_fields() -> None:
    # A consistent header and checksum around a body cut inside the fixed-size fields.
    data = v1_image()[:60]
    data = data[:8] + struct.pack(">I", len(data) - 12) + data[12:] + b"\0\0\0\0"
    rejects(reseal(data), 12, "the fixed-size fields needs 104 bytes but the body has 48 left")


def test_unparsed_bytes_at_the_end_of_the_body() -> None:
    data = v1_image()
    data = data[:8] + struct.pack(">I", 137 + 2) + data[12:149] + b"\0\0" + b"\0\0\0\0"
    rejects(reseal(data), 149, "2 unexpected bytes between the receive queue and the checksum")


@pytest.mark.parametrize("version", [0, 5, 255])
def test_invalid_ip_version(version: int) -> None:
    rejects(patched(v1_image(), 12, ">B", version), 12, f"unknown IP version {version}")


@pytest.mark.parametrize(("offset", "name"), [(13, "local_port"), (15, "remote_port")])
def test_port_zero(offset: int, name: str) -> None:
    rejects(patched(v1_image(), offset, ">H", 0), offset, f"{name} is 0")


@pytest.mark.parametrize(("value", "name"), [(0, "unknown"), (10, "LISTEN"), (12, "unknown"), (255, "unknown")])
def test_invalid_tcp_state(value: int, name: str) -> None:
    rejects(patched(v1_image(), 25, ">B", value), 25, f"invalid TCP state {value} ({name})")


def test_unknown_tcp_option_flags() -> None:
    rejects(patched(v1_image(), 40, ">B", 0x0F), 40, "unknown TCP option flags 0x0f")


@pytest.mark.parametrize(("offset", "name"), [(41, "snd_wscale"), (42, "rcv_wscale")])
def test_window_scale_out_of_range(offset: int, name: str) -> None:
    rejects(patched(v1_image(), offset, ">B", 15), offset, f"{name} 15 exceeds 14")


def test_string_too_long() -> None:
    rejects(patched(v1_image(), 117, ">B", 16), 117, "congestion length 16 exceeds 15")


def test_string_not_utf8() -> None:
    rejects(patched(v1_image(), 120, ">B", 0xFF), 120, "congestion is not UTF-8")


def test_unsent_longer_than_the_send_queue() -> None:
    rejects(patched(v1_image(), 123, ">I", 12), 123, "unsent_len 12 exceeds the send queue's 11 bytes")


def test_every_malformed_kind_is_also_rejected_by_construct() -> None:
    good = v1_image()
    bad = [
        good[:100], good + b"\0", b"SKRQ" + good[4:], patched(good, 4, ">H", 2), patched(good, 6, ">H", 2),
        bytes(good[:-1]) + bytes([good[-1] ^ 1]), patched(good, 12, ">B", 5), patched(good, 13, ">H", 0),
        patched(good, 25, ">B", 10), patched(good, 40, ">B", 8), patched(good, 41, ">B", 15),
        patched(good, 117, ">B", 16), patched(good, 120, ">B", 0xFF), patched(good, 123, ">I", 12),
        patched(good, 127, ">I", 0xFFFFFFFF), patched(good, 142, ">I", 4),
    ]  # fmt: skip
    format.ConnectionImage.parse(good)
    for data in bad:
        with pytest.raises(Exception) as err:
            format.ConnectionImage.parse(data)
        assert type(err.value).__module__.startswith("construct"), err.value
        with pytest.raises(ImageError):
            image.decode(data)


# ---- which field a damaged image blames ----------------------------------------------------------------------------

# (offset, struct format, value written there, the ImageError's offset, its field) in base_state()'s image
DAMAGED_FIELDS = [
    (4, ">H", 4, 4, "version"),
    (6, ">H", 0x8001, 6, "flags"),
    (12, ">B", 5, 12, "tuple.ip_version"),
    (13, ">H", 0, 13, "tuple.local_port"),
    (15, ">H", 0, 15, "tuple.remote_port"),
    (25, ">B", 10, 25, "tcp_state"),
    (40, ">B", 0x0F, 40, "options.flags"),
    (41, ">B", 15, 41, "options.snd_wscale"),
    (42, ">B", 15, 42, "options.rcv_wscale"),
    (116, ">B", 16, 116, "sockopts.bindtodevice"),
    (117, ">B", 16, 117, "sockopts.congestion"),
    (120, ">B", 0xFF, 120, "sockopts.congestion"),  # not UTF-8
    (123, ">I", 12, 123, "unsent_len"),
    (127, ">I", 0xFFFFFFFF, 131, "send_queue"),
    (142, ">I", 0xFFFFFFFF, 146, "recv_queue"),
]


@pytest.mark.parametrize(("at", "fmt", "value", "offset", "field"), DAMAGED_FIELDS, ids=[d[4] for d in DAMAGED_FIELDS])
def test_damaged_image_names_the_offset_and_field(at: int, fmt: str, value: int, offset: int, field: str) -> None:
    # the checksum is made valid again, so the damage reaches the field's own check
    with pytest.raises(ImageError) as err:
        image.decode(patched(v1_image(), at, fmt, value))
    assert (err.value.offset, err.value.field, err.value.path) == (offset, field, None), str(err.value)
    fixed = image._LAYOUTS[4, True].offsets
    if field in fixed:
        assert fixed[field] == at


@pytest.mark.parametrize(
    ("damage", "offset", "field"),
    [
        (lambda d: b"SKRQ" + d[4:], 0, "magic"),
        (lambda d: d[:30] + bytes([d[30] ^ 0x01]) + d[31:], 149, "crc32"),
        (lambda d: d + b"\0", 153, None),
        (lambda d: d[:100], 100, None),
    ],
    ids=["magic", "flipped-byte-fails-the-crc", "trailing-junk", "truncated"],
)
def test_damaged_header_or_length_names_the_offset_and_field(damage: Any, offset: int, field: str | None) -> None:
    with pytest.raises(ImageError) as err:
        image.decode(damage(v1_image()))
    assert (err.value.offset, err.value.field) == (offset, field), str(err.value)


@pytest.mark.parametrize(
    ("end", "field"), [(13, "tuple.local_port"), (49, "window.snd_wnd"), (115, "sockopts.notsent_lowat")]
)
def test_body_cut_inside_the_fixed_fields_names_the_field_cut(end: int, field: str) -> None:
    data = v1_image()[:end]
    data = data[:8] + struct.pack(">I", end - 12) + data[12:] + b"\0\0\0\0"
    with pytest.raises(ImageError) as err:
        image.decode(reseal(data))
    assert (err.value.offset, err.value.field) == (12, field), str(err.value)


def test_not_bytes_has_no_offset() -> None:
    with pytest.raises(ImageError) as err:
        image.decode(12)  # type: ignore[arg-type]
    assert (err.value.offset, err.value.field) == (None, None)


# ---- what encode refuses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"tuple": ConnTuple(socket.AF_UNIX, "a", 1, "b", 2)}, "tuple.family"),
        ({"tuple": ConnTuple(socket.AF_INET, "::1", 1, "10.0.0.2", 2)}, "tuple.local_addr"),
        ({"tuple": ConnTuple(socket.AF_INET6, "::1", 1, "10.0.0.2", 2)}, "tuple.remote_addr"),
        ({"tuple": ConnTuple(socket.AF_INET, "10.0.0.1", 0, "10.0.0.2", 2)}, "tuple.local_port"),
        ({"tuple": ConnTuple(socket.AF_INET, "10.0.0.1", 1, "10.0.0.2", 65536)}, "tuple.remote_port"),
        ({"tcp_state": 10}, "tcp_state"),
        ({"send_seq": 2**32}, "send_seq"),
        ({"recv_seq": -1}, "recv_seq"),
        ({"timestamp": "now"}, "timestamp"),
        ({"options": TcpOptions(70000, True, True, True, 7, 7)}, "options.mss"),
        ({"options": TcpOptions(1460, True, True, True, 15, 7)}, "options.snd_wscale"),
        ({"window": RepairWindow(1, 2, 3, 4, 2**32)}, "window.rcv_wup"),
        ({"window": (1, 2, 3, 4, 5)}, "window"),
        ({"sockopts": SocketOptions(priority=2**31)}, "sockopts.priority"),
        ({"sockopts": SocketOptions(mark=2**31)}, "sockopts.mark"),
        ({"sockopts": SocketOptions(congestion="x" * 16)}, "sockopts.congestion"),
        ({"sockopts": SocketOptions(bindtodevice="\udc80")}, "sockopts.bindtodevice"),
        ({"send_queue": "text"}, "send_queue"),
        ({"unsent_len": 12}, "unsent_len"),
        ({"unsent_len": -1}, "unsent_len"),
    ],
)
def test_encode_names_the_field_it_cannot_hold(changes: dict, field: str) -> None:
    with pytest.raises(ImageError, match=rf"^cannot encode connection state: {field}: ") as err:
        image.encode(base_state(**changes))
    assert (err.value.field, err.value.offset) == (field, None)
    assert image.find_problem(base_state(**changes)) == str(err.value).removeprefix("cannot encode connection state: ")


def test_encode_of_something_else_names_no_field() -> None:
    with pytest.raises(ImageError, match="^cannot encode connection state: dict is not a ConnectionState") as err:
        image.encode({})  # type: ignore[arg-type]
    assert err.value.field is None


# ---- JSON view ----------------------------------------------------------------------------------------------------


def test_json_summary() -> None:
    state = base_state()
    d = state.to_dict()
    assert d["tuple"] == "10.0.0.1:40000->10.0.0.2:443"
    assert d["state"] == "ESTABLISHED"
    assert d["send_queue"] == {
        "length": 11,
        "sha256": "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9",
    }
    assert d["unsent_len"] == 5
    assert d["recv_queue"]["length"] == 3
    assert d["options"] == dataclasses.asdict(state.options)
    assert d["window"] == {"snd_wl1": 1, "snd_wnd": 2, "max_window": 3, "rcv_wnd": 4, "rcv_wup": 5}
    assert d["sockopts"]["congestion"] == "cubic" and d["sockopts"]["nodelay"] is True
    assert json.loads(json.dumps(d)) == d


def test_json_payload() -> None:
    d = base_state().to_dict(payload=True)
    assert d["send_queue"]["base64"] == "aGVsbG8gd29ybGQ="
    assert d["recv_queue"]["base64"] == "YWJj"


def test_json_of_an_unknown_state_still_renders() -> None:
    assert base_state(tcp_state=42).to_dict()["state"] == "unknown state 42"


@given(states())
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_json_round_trip(state: ConnectionState) -> None:
    d = json.loads(json.dumps(state.to_dict(payload=True)))
    assert jsonview.state_from_dict(d) == state


def _json(**changes: object) -> dict:
    d = json.loads(json.dumps(base_state().to_dict(payload=True)))
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = d
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return d


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ([], "the image: want an object, not list"),
        (_json(version=4), "version: 4 is not one of 1, 2, 3"),
        (_json(sockopts__oobinline=KeyError), "sockopts: missing oobinline"),
        (_json(extra=1), "the image: unknown extra"),
        (_json(window=KeyError), "the image: missing window"),
        (_json(tuple="10.0.0.1:1->10.0.0.2"), "tuple: not a connection tuple"),
        (_json(tuple="10.0.0.1:0->10.0.0.2:5"), "tuple: port 0 out of range"),
        (_json(state="LISTENING"), "state: 'LISTENING' is not a TCP state name"),
        (_json(state="LISTEN"), "tcp_state: 10 is not a TCP state an image can hold"),
        (_json(send_seq="1"), "send_seq: '1' is not an int"),
        (_json(send_seq=True), "send_seq: True is not an int"),
        (_json(recv_seq=2**32), "recv_seq: 4294967296 is not in 0..4294967295"),
        (_json(options__sack=1), "options.sack: 1 is not a bool"),
        (_json(options__mss=None), "options.mss: None is not an int"),
        (_json(window__snd_wnd=KeyError), "window: missing snd_wnd"),
        (_json(sockopts__tcp_nodelay=True), "sockopts: unknown tcp_nodelay"),
        (_json(sockopts__congestion=7), "sockopts.congestion: 7 is not a str"),
        (_json(send_queue__base64=KeyError), "send_queue: only a summary, no payload"),
        (_json(recv_queue__base64="YW=Jj"), "recv_queue.base64: not base64"),
        (_json(recv_queue__length=4), "recv_queue.length: says 4 but the payload has 3 bytes"),
        (_json(send_queue__sha256="00"), "send_queue.sha256: does not match the payload"),
        (_json(unsent_len=12), "unsent_len: 12 is not in 0..11"),
    ],
)
def test_json_errors(d: dict, message: str) -> None:
    with pytest.raises(ImageError) as err:
        jsonview.state_from_dict(d)
    assert str(err.value).startswith(f"bad JSON connection image: {message}"), str(err.value)
    assert err.value.offset is None


@pytest.mark.parametrize(
    ("d", "field"),
    [
        ([], None),
        (_json(version=4), "version"),
        (_json(extra=1), "extra"),
        (_json(window=KeyError), "window"),
        (_json(window__snd_wnd=KeyError), "window.snd_wnd"),
        (_json(sockopts__tcp_nodelay=True), "sockopts.tcp_nodelay"),
        (_json(options="x"), "options"),
        (_json(tuple="10.0.0.1:1->10.0.0.2"), "tuple"),
        (_json(state="LISTEN"), "tcp_state"),
        (_json(options__sack=1), "options.sack"),
        (_json(recv_seq=2**32), "recv_seq"),
        (_json(recv_queue__base64="YW=Jj"), "recv_queue.base64"),
        (_json(unsent_len=12), "unsent_len"),
        (_json(sockopts__congestion="x" * 16), "sockopts.congestion"),
    ],
)
def test_json_errors_name_the_field(d: Any, field: str | None) -> None:
    with pytest.raises(ImageError) as err:
        jsonview.state_from_dict(d)
    assert err.value.field == field, str(err.value)


def test_json_of_version_1_reads_with_the_new_options_left_alone() -> None:
    d = _json(version=1)
    for name in (*layout.MORE_SOCKOPT_FLAGS, *layout.MORE_SOCKOPT_INTS, *layout.MORE_SOCKOPT_LONGS):
        del d["sockopts"][name]
    assert jsonview.state_from_dict(d) == base_state()
    d["sockopts"]["oobinline"] = True
    with pytest.raises(ImageError, match="sockopts: unknown oobinline"):
        jsonview.state_from_dict(d)


def test_json_keeps_v4_mapped_addresses_as_sockets_spell_them() -> None:
    state = base_state(tuple=ConnTuple(socket.AF_INET6, "::ffff:10.1.2.3", 5000, "::ffff:10.1.2.4", 6000))
    d = state.to_dict(payload=True)
    assert d["tuple"] == "[::ffff:10.1.2.3]:5000->[::ffff:10.1.2.4]:6000"
    assert jsonview.state_from_dict(d) == state


# ---- version 3: version 2's layout under an XXH3-64 trailer; every version ever written still reads ------------------


def test_version_3_is_version_2_under_an_xxh3_trailer() -> None:
    state = base_state()
    v2, v3 = image.encode(state, version=2), state.to_bytes()
    assert v3[:12] == b"SKRP" + bytes.fromhex("0003 0001 000000ba")  # version 3, window flag, the same 186-byte body
    assert v3[12:198] == v2[12:198] and len(v3) == len(v2) + 4
    assert v3[198:] == struct.pack(">Q", xxhash.xxh3_64_intdigest(v3[:198]))
    parsed = format.ConnectionImage.parse(v3)
    assert (parsed.crc32, parsed.xxh3_64) == (None, struct.unpack(">Q", v3[198:])[0])
    assert format.ConnectionImage.parse(v2).crc32 == zlib.crc32(v2[:198])


@pytest.mark.parametrize("version", layout.VERSIONS)
def test_every_version_builds_as_construct_builds_and_reads_back(version: int) -> None:
    so = SocketOptions(nodelay=True, congestion="cubic", oobinline=True, linger2=30, rcvtimeo_us=1_004_000)
    state = base_state(sockopts=so)
    data = image.encode(state, version=version)
    container = container_of(state)
    container["signed"]["value"]["version"] = version
    assert data == format.ConnectionImage.build(container)
    assert data[4:6] == struct.pack(">H", version)
    # version 1 has no field for the options version 2 added: they read as a new socket's
    want = state if version >= 2 else base_state()
    assert image.decode(data) == want == ConnectionState.from_bytes(data)


@pytest.mark.parametrize("version", layout.VERSIONS)
def test_a_flipped_byte_fails_the_checksum_of_its_version(version: int) -> None:
    data = bytearray(image.encode(base_state(), version=version))
    data[30] ^= 0x01
    field = "xxh3_64" if version >= layout.FIRST_XXH3 else "crc32"
    end = len(data) - layout.CHECKSUM_SIZE[version]
    with pytest.raises(ImageError) as err:
        image.decode(bytes(data))
    assert (err.value.offset, err.value.field) == (end, field), str(err.value)
    with pytest.raises(construct.ChecksumError):
        format.ConnectionImage.parse(bytes(data))


def test_encode_refuses_a_version_never_written() -> None:
    for version in (0, 4):
        with pytest.raises(ImageError, match=f"version {version} is not one of 1, 2, 3") as err:
            image.encode(base_state(), version=version)
        assert err.value.field == "version"


@pytest.mark.parametrize("version", layout.VERSIONS)
def test_json_of_every_version_reads(version: int) -> None:
    d = _json(version=version)
    if version < 2:
        for name in (*layout.MORE_SOCKOPT_FLAGS, *layout.MORE_SOCKOPT_INTS, *layout.MORE_SOCKOPT_LONGS):
            del d["sockopts"][name]
    assert jsonview.state_from_dict(d) == base_state()
    assert base_state().to_dict()["version"] == layout.VERSION == 3


def test_queues_of_an_immutable_image_are_views_of_it_never_copies() -> None:
    import copy
    import pickle

    send, recv = bytes(range(256)) * 4096, b"\xa5" * (1 << 20)
    state = base_state(send_queue=send, unsent_len=1000, recv_queue=recv)
    data = state.to_bytes()
    tracemalloc.start()
    try:
        back = image.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # 2 MiB of queues, none of it copied
    assert isinstance(back.send_queue, memoryview) and back.send_queue.obj is data and back.send_queue.readonly
    assert back == state and back.unsent == send[-1000:] and bytes(back.recv_queue) == recv
    # what the state is turned into elsewhere holds bytes
    for other in (pickle.loads(pickle.dumps(back)), copy.deepcopy(back)):
        assert other == state and type(other.send_queue) is bytes and type(other.recv_queue) is bytes
    assert back.to_bytes() == data
    # a mutable buffer's queues are copies: changing the buffer afterwards changes nothing
    mutable = bytearray(data)
    held = image.decode(mutable)
    mutable[-10] ^= 0xFF
    assert type(held.recv_queue) is bytes and held.recv_queue == recv
