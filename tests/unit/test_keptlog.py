"""kept.img: the journal a keeper appends record by record; a record cut short at the end is what a killed keeper
leaves (`torn`), anything else damaged is an ImageError naming the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from sockrepair.errors import ImageError
from sockrepair.image.keptlog import (
    COUNTS,
    END,
    PACKET,
    counts_record,
    decode_keptlog,
    header,
    record,
)
from tests.clihelp import run_main

P4 = bytes(IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=40000, dport=80, seq=7, flags="PA") / b"GET /")
P6 = bytes(IPv6(src="fd00::2", dst="fd00::1") / TCP(sport=40000, dport=80, seq=9, flags="A"))


def _log(*records: bytes) -> bytes:
    return header() + b"".join(records)


def test_packets_counts_and_end_read_back_in_order() -> None:
    log = decode_keptlog(_log(record(PACKET, P4), counts_record(1, 2, 0), record(PACKET, P6),
                              counts_record(3, 2, 1), record(END, b"the lock expired")))
    assert log.packets == [P4, P6]
    assert (log.over_cap, log.lost, log.truncated, log.fell_back) == (3, 2, 1, 6)
    assert (log.end, log.torn) == ("the lock expired", 0)
    assert decode_keptlog(header()).packets == []


@pytest.mark.parametrize("cut", [1, 4, 5, 20])
def test_a_record_cut_short_at_the_end_is_torn_not_an_error(cut: int) -> None:
    whole = _log(record(PACKET, P4), record(PACKET, P6))
    log = decode_keptlog(whole[:-cut])
    assert log.packets == [P4] and log.end is None
    assert log.torn == len(record(PACKET, P6)) - cut


def test_a_flipped_byte_is_an_image_error_naming_the_record() -> None:
    data = bytearray(_log(record(PACKET, P4), record(PACKET, P6)))
    data[-10] ^= 0x01
    with pytest.raises(ImageError, match="record 1 is damaged") as err:
        decode_keptlog(bytes(data), "d/kept.img")
    assert (err.value.path, err.value.field) == ("d/kept.img", "records[1]")
    assert err.value.offset == len(header()) + len(record(PACKET, P4))


def test_a_bad_header_is_refused() -> None:
    with pytest.raises(ImageError, match="bad header"):
        decode_keptlog(b"SKKL\x00\x02" + header()[6:] + record(PACKET, P4))
    with pytest.raises(ImageError, match="bad header"):
        decode_keptlog(b"SKK")


def test_records_after_the_end_and_unknown_kinds_are_refused() -> None:
    with pytest.raises(ImageError, match="after the end record"):
        decode_keptlog(_log(record(END, b"stopped"), record(PACKET, P4)))
    with pytest.raises(ImageError, match="unknown kind 9"):
        decode_keptlog(_log(record(9, b"x")))
    with pytest.raises(ImageError, match="unknown kind 2"):  # a COUNTS record of the wrong size
        decode_keptlog(_log(record(COUNTS, b"\0" * 8)))


def test_a_record_that_is_not_a_whole_tcp_packet_is_refused() -> None:
    with pytest.raises(ImageError, match="record 0"):
        decode_keptlog(_log(record(PACKET, P4[:-2])))
    udp = bytearray(P4)
    udp[9] = 17
    with pytest.raises(ImageError, match="record 0"):
        decode_keptlog(_log(record(PACKET, bytes(udp))))


def test_show_lists_the_kept_packets(tmp_path: Path) -> None:
    path = tmp_path / "kept.img"
    path.write_bytes(_log(record(PACKET, P4), counts_record(2, 0, 0)))
    code, out, _ = run_main("show", str(path))
    assert code == 0
    assert "1 packet(s) a keeper kept after the dump, 2 not kept; not ended" in out
    assert "10.0.0.1:80->10.0.0.2:40000  seq 7" in out and "[PA] 5 bytes" in out
    code, out, _ = run_main("show", str(path), "--json")
    assert code == 0 and json.loads(out)["over_cap"] == 2 and json.loads(out)["packets"][0]["payload"] == 5


def test_a_later_keepers_log_is_delivered_after_redeliver_and_folded_into_it(tmp_path: Path) -> None:
    """A restore put back hands its recorders to a keeper logging into kept-later.img (sockrepair.move.keep
    Keeper.hand_back): the next restore delivers packets.img, the dump keeper's kept.img as it ended, redeliver.img,
    then kept-later.img (what came last), adds kept-later.img to redeliver.img and removes it with its record."""
    import socket

    from sockrepair.image.packets import NAME as PACKETS
    from sockrepair.image.packets import encode_packets
    from sockrepair.move.keep import REDELIVER, read_kept, resume_keeping
    from sockrepair.move.keeper import LATER, RECORD
    from sockrepair.state import ConnTuple

    dumped, kept, redelivered, later = (
        bytes(IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=40000, dport=80, seq=seq, flags="PA") / b"x")
        for seq in (1, 2, 3, 4))
    conn = ConnTuple(socket.AF_INET, "10.0.0.1", 80, "10.0.0.2", 40000)
    tmp_path.chmod(0o700)
    (tmp_path / PACKETS).write_bytes(encode_packets([dumped]))
    (tmp_path / "kept.img").write_bytes(_log(record(PACKET, kept), record(END, b"handed over to process 1")))
    (tmp_path / REDELIVER).write_bytes(encode_packets([redelivered]))
    (tmp_path / LATER).write_bytes(_log(record(PACKET, later), record(END, b"stopped by a signal")))
    # a keeper that is gone (no such pid: above the kernel's PID_MAX_LIMIT) and no keeper.sock
    (tmp_path / RECORD).write_text(json.dumps({"pid": 4194305, "start_time": 0, "netns": [], "log": LATER}))
    for _ in range(2):  # the second: that restore was put back too, with no new keeper
        packets, keeper = resume_keeping(tmp_path, [conn])
        keeper.close()
        assert packets == [dumped, kept, redelivered, later]
        assert read_kept(tmp_path, [conn], REDELIVER) == [redelivered, later] == keeper.redelivered
        assert not (tmp_path / LATER).exists() and not (tmp_path / RECORD).exists()
