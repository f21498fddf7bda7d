"""apply_in_repair (engine/_sockopts.py) without a kernel: the setsockopt calls it makes for saved options, with
and without what a new socket of the namespace holds (FreshValues): only FRESH_COPIES equal to it are left out."""

from __future__ import annotations

import socket

import pytest

from sockrepair.engine._ffi import lib
from sockrepair.engine._session import _Session
from sockrepair.engine._sockopts import FRESH_COPIES, FreshValues, apply_in_repair
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
    def __init__(self, fail: int | None = None) -> None:
        self.calls: list[tuple[int, int, object]] = []
        self.fail = fail

    def setsockopt(self, level: int, opt: int, value: object) -> None:
        if opt == self.fail:
            raise OSError(2, "No such file or directory")
        self.calls.append((level, opt, value))


def _calls(so: SocketOptions, family: int = socket.AF_INET, fresh: FreshValues | None = None) -> list[tuple]:
    session = _Session(-1)
    recorder = _Recorder()
    session.sock = recorder  # type: ignore[assignment]
    apply_in_repair(session, family, so, fresh)
    return recorder.calls


def test_without_fresh_values_every_saved_value_a_new_socket_may_lack_is_set() -> None:
    assert _calls(SAVED) == ALWAYS[:1] + [COPIES[0]] + ALWAYS[1:] + COPIES[1:] + [(TCP, lib.TCP_CONGESTION, b"cubic")]


def test_with_fresh_values_the_copies_a_new_socket_holds_are_left_out() -> None:
    fresh = FreshValues({socket.AF_INET: dict(NEW_SOCKET)})
    assert _calls(SAVED, fresh=fresh) == ALWAYS + [(TCP, lib.TCP_CONGESTION, b"cubic")]
    # the same values again: the same calls (worked out once for this FreshValues)
    assert _calls(SAVED, fresh=fresh) == ALWAYS + [(TCP, lib.TCP_CONGESTION, b"cubic")]
    assert _calls(SAVED) == ALWAYS[:1] + [COPIES[0]] + ALWAYS[1:] + COPIES[1:] + [(TCP, lib.TCP_CONGESTION, b"cubic")]


@pytest.mark.parametrize("field", FRESH_COPIES)
def test_a_copy_that_differs_from_the_new_sockets_is_set(field: str) -> None:
    fresh = FreshValues({socket.AF_INET: dict(NEW_SOCKET, **{field: NEW_SOCKET[field] // 2})})
    made = {(level, opt) for level, opt, _ in _calls(SAVED, fresh=fresh)}
    copies = {name: (level, opt) for name, (level, opt, _) in zip(FRESH_COPIES, COPIES, strict=True)}
    assert made & set(copies.values()) == {copies[field]}


def test_fresh_values_of_another_family_change_nothing() -> None:
    fresh = FreshValues({socket.AF_INET: dict(NEW_SOCKET)})
    calls = _calls(SAVED, socket.AF_INET6, fresh)
    assert (IPV6, lib.IPV6_MTU_DISCOVER, 1) in calls and (TCP, lib.TCP_RTO_MIN_US, 200_000) in calls


def test_a_failed_congestion_control_is_named() -> None:
    session = _Session(-1)
    session.sock = _Recorder(fail=lib.TCP_CONGESTION)  # type: ignore[assignment]
    with pytest.raises(SocketCallError, match="congestion control 'cubic' is not available") as err:
        apply_in_repair(session, socket.AF_INET, SAVED)
    assert err.value.errno == 2 and err.value.op.startswith("setsockopt(TCP_CONGESTION")
