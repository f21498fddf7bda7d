"""packets.img: the peers' packets kept by the lock, stored beside the images; damaged files are ImageErrors."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from sockrepair.errors import ImageError
from sockrepair.image.packets import decode_packets, encode_packets
from tests.clihelp import run_main

P4 = bytes(IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=40000, dport=80, seq=7, flags="PA") / b"GET /")
P6 = bytes(IPv6(src="fd00::2", dst="fd00::1") / TCP(sport=40000, dport=80, seq=9, flags="A"))


def _resealed(data: bytearray) -> bytes:
    """The file with its CRC made right again, so that the check after it is the one that must refuse."""
    struct.pack_into(">I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    return bytes(data)


def test_round_trip_keeps_order_and_bytes() -> None:
    data = encode_packets([P4, P6, P4])
    assert data[:4] == b"SKPK" and struct.unpack_from(">HI", data, 4) == (1, 3)
    assert decode_packets(data) == [P4, P6, P4]
    assert decode_packets(encode_packets([])) == []


def test_a_flipped_byte_fails_the_checksum() -> None:
    data = bytearray(encode_packets([P4]))
    data[20] ^= 0x40
    with pytest.raises(ImageError, match="packets.img") as err:
        decode_packets(bytes(data), "d/packets.img")
    assert err.value.path == "d/packets.img" and err.value.field is not None and "crc32" in err.value.field


@pytest.mark.parametrize("cut", [3, 9, 15, 30])
def test_a_cut_file_is_refused(cut: int) -> None:
    with pytest.raises(ImageError):
        decode_packets(encode_packets([P4, P6])[:-cut])


def test_another_version_is_refused() -> None:
    data = bytearray(encode_packets([P4]))
    data[5] = 2
    with pytest.raises(ImageError, match="not a valid") as err:
        decode_packets(_resealed(data))
    assert err.value.field is not None and "version" in err.value.field


def test_a_packet_that_is_not_a_whole_tcp_packet_is_refused_with_its_index() -> None:
    udp = bytearray(P4)
    udp[9] = 17  # UDP
    for bad in (bytes(udp), P4[:-2], b"\x45" + bytes(30)):
        with pytest.raises(ImageError, match="packet 1") as err:
            decode_packets(encode_packets([P6, bad]))
        assert err.value.field == "packets[1]"


def test_show_lists_the_kept_packets(tmp_path: Path) -> None:
    path = tmp_path / "packets.img"
    path.write_bytes(encode_packets([P4, P6]))
    code, out, err = run_main("show", str(path), "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["packets"] == [
        {"tuple": "10.0.0.1:80->10.0.0.2:40000", "seq": 7, "ack": 0, "flags": "PA", "payload": 5},
        {"tuple": "[fd00::1]:80->[fd00::2]:40000", "seq": 9, "ack": 0, "flags": "A", "payload": 0},
    ]
    code, out, _ = run_main("show", str(path))
    assert code == 0 and "2 packet(s)" in out and "seq 7 ack 0 [PA] 5 bytes" in out
    path.write_bytes(encode_packets([P4])[:-1])
    code, out, err = run_main("show", str(path))
    assert code == 1 and err.startswith("sockrepair: error: ") and err.count("\n") == 1 and out == ""


def test_a_restore_refuses_a_packet_for_a_connection_not_in_its_directory(tmp_path: Path) -> None:
    """A forged packets.img must not make a restore send packets anywhere but to the restored connections."""
    from sockrepair.move.keep import read_kept
    from sockrepair.state import ConnTuple

    ours = ConnTuple.parse("10.0.0.1:80->10.0.0.2:40000")
    (tmp_path / "packets.img").write_bytes(encode_packets([P4]))
    assert read_kept(tmp_path, [ours]) == [P4]
    forged = bytes(IP(src="8.8.8.8", dst="10.9.9.9") / TCP(sport=443, dport=5555, flags="R"))
    (tmp_path / "packets.img").write_bytes(encode_packets([P4, forged]))
    with pytest.raises(ImageError, match="packet 1 is for 10.9.9.9:5555->8.8.8.8:443") as err:
        read_kept(tmp_path, [ours])
    assert err.value.field == "packets[1]"
    assert read_kept(tmp_path / "none", [ours]) == []
