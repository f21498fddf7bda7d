"""The wire checks on synthetic segment lists: they pass a clean stream and fail each kind of damage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sockrepair.cli.verify import add_verify_command
from sockrepair.errors import WireError
from sockrepair.lab.analysis import analyse, format_report
from sockrepair.lab.pcap import Frame, Segment, read_segments, write_pcap
from sockrepair.state import ConnTuple

CONN = ConnTuple.parse("198.18.0.1:5000->198.18.0.100:7000")
ACK, PSH_ACK, FIN_ACK, RST, SYN = 0x10, 0x18, 0x11, 0x04, 0x02


def out(ts: float, seq: int, length: int, flags: int = PSH_ACK, ack: int = 1) -> Segment:
    return Segment(ts, "198.18.0.1", 5000, "198.18.0.100", 7000, seq % 2**32, ack, flags, length)


def back(ts: float, seq: int, length: int, flags: int = PSH_ACK, ack: int = 1) -> Segment:
    return Segment(ts, "198.18.0.100", 7000, "198.18.0.1", 5000, seq % 2**32, ack, flags, length)


def stream(start: float = 1000.0, seq: int = 1000, other_seq: int = 50_000, n: int = 5) -> list[Segment]:
    """n exchanges: 100 bytes out, 40 bytes back, 10 ms apart."""
    segs = []
    for i in range(n):
        segs.append(out(start + i * 0.01, seq + i * 100, 100))
        segs.append(back(start + i * 0.01 + 0.001, other_seq + i * 40, 40))
    return segs


def test_clean_stream_is_ok() -> None:
    report = analyse(stream(), CONN)
    assert report.ok, report.problems
    assert [d.bytes for d in report.directions] == [500, 200]
    assert [d.data_segments for d in report.directions] == [5, 5]
    assert report.segments == 10


def test_tuple_from_the_other_side_and_other_connections_ignored() -> None:
    noise = Segment(1000.5, "198.18.0.1", 5001, "198.18.0.100", 7000, 1, 1, RST, 0)
    report = analyse([*stream(), noise], CONN.reversed())
    assert report.ok, report.problems
    assert report.segments == 10
    assert report.directions[0].name == str(CONN.reversed())


def test_gap_is_a_failure() -> None:
    segs = stream()
    del segs[4]  # the third outgoing segment: bytes 200..300 never on the wire
    report = analyse(segs, CONN)
    assert not report.ok
    assert report.directions[0].holes == [(200, 300)]
    assert report.directions[0].out_of_order == 1
    assert any("bytes 200..300" in p for p in report.problems)


def test_gap_at_the_end_is_seen_from_a_later_ack() -> None:
    # a pure ACK whose sequence number says 100 more bytes were sent than ever crossed the wire
    segs = [*stream(), out(1001.0, 1000 + 600, 0, ACK)]
    report = analyse(segs, CONN)
    assert report.directions[0].holes == [(500, 600)]
    assert not report.ok


def test_retransmission_and_overlap_allowed_and_counted() -> None:
    segs = stream()
    segs.append(out(1000.05, 1100, 100))  # the second segment again
    segs.append(out(1000.06, 1450, 100))  # half old, half new: overlap
    report = analyse(segs, CONN)
    assert report.ok, report.problems
    assert report.directions[0].retransmitted_bytes == 150
    assert report.directions[0].bytes == 550


def test_reordering_that_fills_in_is_ok() -> None:
    segs = stream()
    segs[2], segs[4] = segs[4], segs[2]
    report = analyse(segs, CONN)
    assert report.ok, report.problems
    assert report.directions[0].out_of_order == 1


def test_rst_flagged() -> None:
    report = analyse([*stream(), back(1001.0, 50_200, 0, RST)], CONN)
    assert not report.ok
    assert report.directions[1].rst == 1
    assert any("RST" in p for p in report.problems)


def test_syn_flagged() -> None:
    report = analyse([out(999.0, 999, 0, SYN), *stream()], CONN)
    assert not report.ok
    assert report.directions[0].syn == 1
    assert report.directions[0].holes == []  # the SYN's sequence number is accounted for


def test_fin_flagged_unless_allowed() -> None:
    segs = [*stream(), out(1001.0, 1500, 0, FIN_ACK), back(1001.001, 50_200, 0, ACK, ack=1501)]
    assert not analyse(segs, CONN).ok
    report = analyse(segs, CONN, allow_fin=True)
    assert report.ok, report.problems
    assert report.directions[0].fin == 1


def test_segment_after_fin_accounts_for_its_sequence_number() -> None:
    segs = [*stream(), out(1001.0, 1500, 0, FIN_ACK), out(1001.2, 1501, 0, ACK)]
    report = analyse(segs, CONN, allow_fin=True)
    assert report.ok, report.problems


def test_sequence_wraparound() -> None:
    start = 2**32 - 250  # the third segment crosses 2^32
    segs = stream(seq=start, other_seq=2**32 - 30)
    report = analyse(segs, CONN)
    assert report.ok, report.problems
    assert [d.bytes for d in report.directions] == [500, 200]
    damaged = [s for s in segs if not (s.src_port == 5000 and s.seq == (start + 300) % 2**32)]
    report = analyse(damaged, CONN)
    assert report.directions[0].holes == [(300, 400)]


def test_window_probe_below_the_stream_is_not_a_gap() -> None:
    # TCP_REPAIR off sends a probe with seq snd_una - 1: behind everything seen, no data
    segs = [*stream(), back(1000.2, 50_200 - 1, 0, ACK)]
    assert analyse(segs, CONN).ok


def test_a_window_probe_first_is_not_a_gap_and_a_hole_after_a_pure_ack_still_is() -> None:
    # a connection silent until the move: the first segment captured from the restored side is the window probe of
    # the repair's end (seq snd_una - 1, no data), the answers follow from snd_una
    probe_first = [back(1000.0, 49_999, 0, ACK), *stream()]
    assert analyse(probe_first, CONN).ok, analyse(probe_first, CONN).problems
    # a pure ACK at snd_nxt, then data from 40 bytes further on: those 40 bytes were lost, not probed
    lost = [back(1000.0, 50_000, 0, ACK), *[s for s in stream() if s.src_port == 5000 or s.seq != 50_000]]
    report = analyse(lost, CONN)
    assert report.directions[1].holes == [(0, 40)]
    # later in the stream a pure ACK at snd_nxt, then data one byte further on: that byte was lost
    off_by_one = [*stream(n=2), back(1000.05, 50_080, 0, ACK), back(1000.06, 50_081, 40)]
    assert analyse(off_by_one, CONN).directions[1].holes == [(80, 81)]


def test_wire_gap_and_silences() -> None:
    segs = stream(n=3) + stream(start=1000.5, seq=1300, other_seq=50_120, n=3)
    report = analyse(segs, CONN, freeze=1000.03, resume=1000.49)
    gap = report.wire_gap
    assert gap is not None and gap.last_before == pytest.approx(1000.021) and gap.first_after == pytest.approx(1000.5)
    assert gap.seconds == pytest.approx(0.479)
    out_silence = report.directions[0].largest_silence
    assert out_silence is not None and out_silence.seconds == pytest.approx(0.48)
    assert out_silence.after == pytest.approx(1000.02) and out_silence.before == pytest.approx(1000.5)
    assert report.ok, report.problems


def test_nothing_after_resume_is_a_failure() -> None:
    report = analyse(stream(), CONN, freeze=1000.5, resume=1000.6)
    assert not report.ok
    assert report.wire_gap is not None and report.wire_gap.first_after is None


def test_empty_capture_and_drops_are_failures() -> None:
    assert not analyse([], CONN).ok
    report = analyse(stream(), CONN, capture_drops=3)
    assert not report.ok and "dropped 3" in report.problems[0]


def test_report_dict_and_text() -> None:
    report = analyse(stream(), CONN, freeze=1000.02, resume=1000.03)
    view = json.loads(json.dumps(report.to_dict()))
    assert view["ok"] is True and view["directions"][0]["bytes"] == 500
    assert view["wire_gap"]["seconds"] == pytest.approx(0.01)
    text = format_report(report)
    assert text.startswith(f"connection {CONN}: ok") and "wire gap" in text


def _frames() -> list[Frame]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    frames = []
    for seg in stream(n=3):
        pkt = Ether() / IP(src=seg.src_addr, dst=seg.dst_addr) / TCP(
            sport=seg.src_port, dport=seg.dst_port, seq=seg.seq, ack=seg.ack, flags=seg.flags) / (b"x" * seg.length)
        frames.append(Frame(seg.ts, bytes(pkt)))
    return frames


def test_pcap_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    write_pcap(path, _frames())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    segs = read_segments(path)
    assert [(s.window, s.ip_id, s.tsval, s.options) for s in segs] == [(8192, 1, None, b"")] * 6  # scapy's defaults
    assert [dataclasses.replace(s, window=0, ip_id=None) for s in segs] == stream(n=3)


def test_first_frame_of_a_fresh_process_is_parsed() -> None:
    # scapy binds IP under Ether only once its module is imported: the first dissection must already see it
    script = (f"from sockrepair.lab.pcap import Frame, parse_frames; "
              f"print(len(parse_frames([Frame(1.0, bytes.fromhex({_frames()[0].data.hex()!r}))])))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"


def _verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_verify_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["verify", *argv])
    return int(args.func(args))


def test_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.pcap"
    frames = _frames()
    write_pcap(path, frames[:2] + frames[3:])  # without the second outgoing segment
    assert _verify([str(path), "--tuple", str(CONN), "--json"]) == 1
    view = json.loads(capsys.readouterr().out)
    assert view["directions"][0]["holes"] == [[100, 200]]
    write_pcap(path, _frames())
    assert _verify([str(path), "--tuple", str(CONN), "--freeze", "1000.015", "--resume", "1000.016"]) == 0
    assert "ok" in capsys.readouterr().out


def test_verify_bad_input(tmp_path: Path) -> None:
    with pytest.raises(WireError, match="no capture file"):
        _verify([str(tmp_path / "missing.pcap"), "--tuple", str(CONN)])
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"not a capture at all")
    with pytest.raises(WireError, match="cannot read capture"):
        _verify([str(junk), "--tuple", str(CONN)])
    with pytest.raises(SystemExit):
        _verify([str(junk), "--tuple", "nonsense"])


def _stamped(seg: Segment, ip_id: int | None, tsval: int | None) -> Segment:
    return dataclasses.replace(seg, window=512, ip_id=ip_id, tsval=tsval)


def test_a_kept_and_delivered_copy_is_not_a_retransmission() -> None:
    """The peer's request seen twice with every field equal (the lock's copy delivered 3 ms later) is counted as
    delivered with its delay; the peer's own retransmission (new IPv4 id, new TSval) still counts as one."""
    request = _stamped(out(1000.0, 1000, 100), 7, 555)
    delivered = dataclasses.replace(request, ts=1000.003)
    resent = _stamped(out(1000.21, 1000, 100), 9, 765)
    report = analyse([request, delivered, _stamped(back(1000.004, 50_000, 40), 3, 900)], CONN)
    peer = report.directions[0]
    assert report.ok, report.problems
    assert (peer.segments, peer.data_segments, peer.bytes, peer.retransmitted_bytes) == (2, 1, 100, 0)
    assert peer.delivered == 1 and peer.delivered_delays == [pytest.approx(0.003)]
    assert "1 kept and delivered by sockrepair" in format_report(report)
    assert report.to_dict()["directions"][0]["delivered"] == 1
    again = analyse([request, resent], CONN).directions[0]
    assert (again.delivered, again.retransmitted_bytes) == (0, 100)


@pytest.mark.parametrize("ip_id,tsval", [(7, None), (None, 555)], ids=["ipv4-id", "timestamp"])
def test_either_identity_field_is_enough(ip_id: int | None, tsval: int | None) -> None:
    request = _stamped(out(1000.0, 1000, 100), ip_id, tsval)
    peer = analyse([request, dataclasses.replace(request, ts=1000.001)], CONN).directions[0]
    assert (peer.delivered, peer.retransmitted_bytes) == (1, 0)


def test_without_an_identity_a_repeat_is_a_retransmission() -> None:
    """IPv6 without TCP timestamps: a copy cannot be told from the peer's retransmission; counted as the latter."""
    request = out(1000.0, 1000, 100)
    peer = analyse([request, dataclasses.replace(request, ts=1000.2)], CONN).directions[0]
    assert (peer.delivered, peer.retransmitted_bytes) == (0, 100)


def test_duplicate_acks_with_other_sack_blocks_are_not_copies() -> None:
    first = dataclasses.replace(_stamped(out(1000.0, 1000, 0, ACK), None, 555), options=b"\x05\x0a" + bytes(8))
    second = dataclasses.replace(first, ts=1000.0005, options=b"\x05\x0a" + bytes(4) + b"\x00\x00\x01\x00")
    assert analyse([first, second], CONN).directions[0].delivered == 0
