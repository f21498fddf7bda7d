"""apply_in_repair (engine/_sockopts.py) without a kernel: the setsockopt calls it makes for saved options, with
and without what a new socket of the namespace holds (FreshValues): only FRESH_COPIES equal to it are left out."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from sockrepair.engine import _sockopts
from sockrepair.engine._ffi import ffi, lib
from sockrepair.engine._session import _Session
from sockrepair.engine._sockopts import (
    FRESH_COPIES,
    FRESH_WORTH,
    FreshValues,
    apply_in_repair,
    batch_fresh_values,
    set_fresh_copies,
)
from sockrepair.errors import SocketCallError
from sockrepair.state import SocketOptions

TCP, IP, IPV6, SOL = socket.IPPROTO_TCP, socket.IPPROTO_IP, socket.IPPROTO_IPV6, socket.SOL_SOCKET
# a loopback connection's saved options on a stock 6.15+ host
SAVED = SocketOptions(keepidle=7200, keepintvl=75, keepcnt=9, ttl=64, linger2=60, window_clamp=65536,
                      mtu_discover=1, rto_max_ms=120_000, rto_min_us=200_000, delack_max_us=200_000,
                      congestion="cubic")
NEW_SOCKET = {"mtu_discover": 1, "rto_max_ms": 120_000, "rto_min_us": 200_000, "delack_max_us": 200_000}
ALWAYS = [(IP, lib.IP_TTL, 64), (TCP, lib.TCP_KEEPIDLE, 7200), (TCP, lib.TCP_KEEPINTVL, 75),
          (TCP, lib.TCP_KEEPCNT, 9), (TCP, lib.TCP_LINGER2, 60), (TCP, lib.TCP_WINDOW_CLAMP, 65536)]
COPIES = [(IP, lib.IP_MTU_DISCOVER, 1), (TCP, lib.TCP_RTO_MAX_MS, 120_000), (TCP, lib.TCP_RTO_MIN_US, 200_000),
          (TCP, lib.TCP_DELACK_MAX_US, 200_000)]


class _Recorder:
    """The session's socket methods (int values) and libc's setsockopt through cffi (structs, names)."""

    def __init__(self, fail: int | None = None) -> None:
        self.calls: list[tuple[int, int, object]] = []
        self.fail = fail

    def setsockopt(self, level: int, opt: int, value: object) -> None:
        self.calls.append((level, opt, value))

    def libc(self, fd: int, level: int, opt: int, value: bytes, length: int) -> int:
        assert (fd, length) == (-1, len(value))
        if opt == self.fail:
            ffi.errno = errno.ENOENT
            return -1
        self.calls.append((level, opt, value))
        return 0


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    made = _Recorder()
    monkeypatch.setattr(_sockopts, "setsockopt", made.libc)
    return made


def _apply(recorder: _Recorder, so: SocketOptions, family: int = socket.AF_INET,
           fresh: FreshValues | None = None) -> list[tuple[int, int, object]]:
    session = _Session(-1)
    session.sock = recorder  # type: ignore[assignment]
    recorder.calls.clear()
    apply_in_repair(session, family, so, fresh)
    return recorder.calls


def test_without_fresh_values_every_saved_value_a_new_socket_may_lack_is_set(recorder: _Recorder) -> None:
    assert _apply(recorder, SAVED) == ALWAYS[:1] + [COPIES[0]] + ALWAYS[1:] + COPIES[1:] + [(TCP, lib.TCP_CONGESTION, b"cubic")]


def test_with_fresh_values_the_copies_a_new_socket_holds_are_left_out(recorder: _Recorder) -> None:
    fresh = FreshValues({socket.AF_INET: dict(NEW_SOCKET)})
    assert _apply(recorder, SAVED, fresh=fresh) == ALWAYS + [(TCP, lib.TCP_CONGESTION, b"cubic")]
    # the same values again: the same calls (worked out once for this FreshValues)
    assert _apply(recorder, SAVED, fresh=fresh) == ALWAYS + [(TCP, lib.TCP_CONGESTION, b"cubic")]
    assert _apply(recorder, SAVED) == ALWAYS[:1] + [COPIES[0]] + ALWAYS[1:] + COPIES[1:] + [(TCP, lib.TCP_CONGESTION, b"cubic")]


@pytest.mark.parametrize("field", FRESH_COPIES)
def test_a_copy_that_differs_from_the_new_sockets_is_set(recorder: _Recorder, field: str) -> None:
    fresh = FreshValues({socket.AF_INET: dict(NEW_SOCKET, **{field: NEW_SOCKET[field] // 2})})
    made = {(level, opt) for level, opt, _ in _apply(recorder, SAVED, fresh=fresh)}
    copies = {name: (level, opt) for name, (level, opt, _) in zip(FRESH_COPIES, COPIES, strict=True)}
    assert made & set(copies.values()) == {copies[field]}


def test_fresh_values_of_another_family_change_nothing(recorder: _Recorder) -> None:
    fresh = FreshValues({socket.AF_INET: dict(NEW_SOCKET)})
    calls = _apply(recorder, SAVED, socket.AF_INET6, fresh)
    assert (IPV6, lib.IPV6_MTU_DISCOVER, 1) in calls and (TCP, lib.TCP_RTO_MIN_US, 200_000) in calls


def test_a_failed_congestion_control_is_named(recorder: _Recorder) -> None:
    recorder.fail = lib.TCP_CONGESTION
    with pytest.raises(SocketCallError, match="congestion control 'cubic' is not available") as err:
        _apply(recorder, SAVED)
    assert err.value.errno == errno.ENOENT and err.value.op.startswith("setsockopt(TCP_CONGESTION")


def test_linger_and_timeouts_go_as_structs(recorder: _Recorder) -> None:
    so = SocketOptions(linger_on=True, linger_secs=9, rcvtimeo_us=1_500_000, congestion="reno")
    structs = [call for call in _apply(recorder, so) if isinstance(call[2], bytes)]
    assert structs == [(SOL, lib.SO_LINGER, struct.pack("ii", 1, 9)),
                       (SOL, lib.SO_RCVTIMEO_OLD, struct.pack("ll", 1, 500_000)),
                       (TCP, lib.TCP_CONGESTION, b"reno")]


def test_set_fresh_copies_sets_each_saved_copy_but_an_option_never_read(recorder: _Recorder) -> None:
    session = _Session(-1)
    session.sock = recorder  # type: ignore[assignment]
    set_fresh_copies(session, socket.AF_INET, SAVED)
    assert recorder.calls == COPIES
    recorder.calls.clear()
    # a state from a kernel without TCP_RTO_MAX_MS and the others (read as 0): only the MTU discovery mode
    set_fresh_copies(session, socket.AF_INET6, SocketOptions(mtu_discover=2, rto_max_ms=0, rto_min_us=0,
                                                             delack_max_us=0))
    assert recorder.calls == [(IPV6, lib.IPV6_MTU_DISCOVER, 2)]


def test_a_small_batch_reads_no_fresh_values(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: object) -> None:
        raise AssertionError("a new socket was made")

    monkeypatch.setattr(_sockopts.socket, "socket", no_socket)
    assert batch_fresh_values([socket.AF_INET] * 3, FRESH_WORTH - 1) is None
