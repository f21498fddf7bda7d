"""Field-by-field comparison of a sockrepair checkpoint with criu's: what counts as the same, what is explained
(the timestamp clock ran on, traffic moved the queues and windows, options criu does not keep) and what fails."""

from __future__ import annotations

import socket

from sockrepair.criu.compare import DIFFERS, EXPLAINED, NOT_KEPT, SAME, compare_states
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)

SEND = bytes(range(200)) * 5
RECV = bytes(range(100, 200)) * 3


def state(**changes: object) -> ConnectionState:
    base = ConnectionState(
        tuple=ConnTuple(socket.AF_INET, "127.0.0.1", 40000, "127.0.0.1", 7022),
        tcp_state=1, send_seq=5000, recv_seq=9000, send_queue=SEND, unsent_len=100, recv_queue=RECV,
        options=TcpOptions(65495, True, True, True, 10, 10), window=RepairWindow(8700, 65536, 65536, 65536, 9000),
        timestamp=123456, sockopts=SocketOptions(congestion="cubic", sndbuf=16384, rcvbuf=131072),
    )
    return base.replace(**changes)


def verdicts(ours: ConnectionState, criu: ConnectionState, apart_ms: float = 50) -> dict[str, str]:
    return {f.name: f.verdict for f in compare_states(ours, criu, apart_ms) if f.verdict != SAME}


def test_identical_checkpoints_are_the_same_field_by_field() -> None:
    results = compare_states(state(), state(), 10)
    assert {f.verdict for f in results} == {SAME}
    names = {f.name for f in results}
    assert {"send_seq", "recv_seq", "send_queue", "recv_queue", "unsent_len", "options.mss", "options.snd_wscale",
            "options.sack", "options.timestamps", "timestamp", "window.rcv_wnd", "sockopts.nodelay"} <= names


def test_the_timestamp_clock_may_run_on_by_the_time_between_the_checkpoints() -> None:
    assert verdicts(state(), state(timestamp=123456 + 40)) == {"timestamp": EXPLAINED}
    assert verdicts(state(), state(timestamp=123456 + 500)) == {"timestamp": DIFFERS}
    assert verdicts(state(), state(timestamp=123456 - 1)) == {"timestamp": DIFFERS}
    # Across the u32 wrap.
    assert verdicts(state(timestamp=2**32 - 10), state(timestamp=20)) == {"timestamp": EXPLAINED}


def test_options_criu_does_not_keep_are_reported_not_failed() -> None:
    results = {f.name: f for f in compare_states(state(), state(sockopts=SocketOptions(sndbuf=16384,
                                                                                        rcvbuf=131072)), 10)}
    assert results["sockopts.congestion"].verdict == NOT_KEPT and "no field" in results["sockopts.congestion"].why


def test_negotiated_options_and_socket_options_must_match() -> None:
    opts = TcpOptions(1460, True, True, True, 10, 10)
    assert verdicts(state(), state(options=opts)) == {"options.mss": DIFFERS}
    assert verdicts(state(), state(sockopts=SocketOptions(congestion="cubic", nodelay=True, sndbuf=16384,
                                                          rcvbuf=131072))) == {"sockopts.nodelay": DIFFERS}


def test_traffic_between_the_checkpoints_is_explained_when_the_bytes_agree() -> None:
    # 300 more bytes were written, the first 250 acknowledged; 40 more arrived and 60 were read.
    more = bytes(range(300)[i % 256] for i in range(300))
    later = state(send_seq=5300, send_queue=SEND[250:] + more, unsent_len=300,
                  recv_seq=9040, recv_queue=RECV[60:] + b"x" * 40,
                  window=RepairWindow(8740, 65536, 65536, 65536, 9040), timestamp=123456 + 30,
                  sockopts=SocketOptions(congestion="cubic", sndbuf=32768, rcvbuf=131072))
    got = verdicts(state(), later)
    assert set(got.values()) == {EXPLAINED}
    assert {"send_seq", "send_queue", "unsent_len", "recv_seq", "recv_queue", "window.snd_wl1", "window.rcv_wup",
            "sockopts.sndbuf", "timestamp"} == set(got)


def test_traffic_that_changed_bytes_already_held_is_a_failure() -> None:
    flipped = SEND[:400] + b"\xff" + SEND[401:]
    assert verdicts(state(), state(send_queue=flipped)) == {"send_queue": DIFFERS}
    moved_on = SEND[100:400] + b"\xff" + SEND[401:] + b"n" * 100
    got = verdicts(state(), state(send_seq=5100, send_queue=moved_on))
    assert got["send_queue"] == got["send_seq"] == DIFFERS
    assert verdicts(state(), state(send_seq=4990))["send_seq"] == DIFFERS
    assert verdicts(state(), state(recv_queue=b"y" + RECV[1:]))["recv_queue"] == DIFFERS


def test_windows_and_buffers_that_move_without_traffic_are_failures() -> None:
    got = verdicts(state(), state(window=RepairWindow(8700, 65536, 65536, 1000, 9000),
                                  sockopts=SocketOptions(congestion="cubic", sndbuf=1, rcvbuf=131072)))
    assert got == {"window.rcv_wnd": DIFFERS, "sockopts.sndbuf": DIFFERS}


def test_unsent_length_must_match_when_the_queue_did_not_move() -> None:
    assert verdicts(state(), state(unsent_len=50)) == {"unsent_len": DIFFERS}


def test_a_missing_repair_window_is_not_kept_not_failed() -> None:
    assert verdicts(state(), state(window=None)) == {"window": NOT_KEPT}
