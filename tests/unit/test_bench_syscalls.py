"""The system calls per cycle (sockrepair/bench/syscalls.py) counted from an strace output: only the marked stretches,
option calls by level and name, the C side's untimed calls left out; and the report's verdict on whether the C
reference makes the same option calls as the engine."""

from __future__ import annotations

import pytest

from sockrepair.bench import report, syscalls
from sockrepair.bench.results import Syscalls
from sockrepair.errors import BenchmarkError

START, END = (f"close({fd}) = -1 EBADF (Bad file descriptor)" for fd in syscalls.MARKS)

PYTHON = [
    "getsockopt(4, SOL_IP, IP_TOS, [0], [4]) = 0",
    "getsockopt(4, SOL_SOCKET, SO_TYPE, [1], [4]) = 0",
    "setsockopt(4, SOL_TCP, TCP_REPAIR, [1], 4) = 0",
    "clock_gettime(CLOCK_MONOTONIC, {tv_sec=1, tv_nsec=2}) = 0",
    "ioctl(4, TIOCOUTQ, [0]) = 0",
    "close(4) = 0",
    "socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = 3",
    "setsockopt(3, SOL_TCP, 0x2c /* TCP_??? */, [120000], 4) = 0",
]
C = [
    "ioctl(5, TIOCOUTQ, [0]) = 0",  # untimed: sizes the kept buffers
    "ioctl(5, FIONREAD, [0]) = 0",
    "getsockopt(5, SOL_IP, IP_TOS, [0], [4]) = 0",
    "setsockopt(5, SOL_TCP, TCP_REPAIR, [1], 4) = 0",
    "ioctl(5, TIOCOUTQ, [0]) = 0",
    "close(5) = 0",
    "socket(AF_INET, SOCK_STREAM, IPPROTO_IP) = 5",
    "setsockopt(5, SOL_TCP, TCP_REPAIR, [0], 4) = 0",
    "getsockopt(5, SOL_IP, IP_TOS, [0], [4]) = 0",  # untimed: the options checked after the restore
]


def _trace(*stretches: list[str], pid: int = 700) -> str:
    lines = ["execve(\"/usr/bin/python3\", [...]) = 0", "getsockopt(9, SOL_SOCKET, SO_ERROR, [0], [4]) = 0"]
    for stretch in stretches:
        lines += [START, *stretch, END, "recvfrom(9, \"x\", 1, 0, NULL, NULL) = 1"]  # the verification: not counted
    return "\n".join(f"{pid} {line}" for line in lines) + "\n"


def test_the_marked_cycles_are_counted_by_name_and_option() -> None:
    ours, c = syscalls.parse(_trace(PYTHON, C), [0])
    assert ours == {"impl": "sockrepair", "queue_bytes": 0, "total": 7,
                    "calls": {"getsockopt": 2, "setsockopt": 2, "ioctl": 1, "close": 1, "socket": 1},
                    "options": {"getsockopt SOL_IP IP_TOS": 1, "getsockopt SOL_SOCKET SO_TYPE": 1,
                                "setsockopt SOL_TCP 0x2c": 1, "setsockopt SOL_TCP TCP_REPAIR": 1},
                    "untimed": 0}
    # at 0 B the C side is like-for-like: its two queue-length reads and the option read back are left out
    assert c["impl"] == "c-options" and c["untimed"] == 3 and c["total"] == 6
    assert c["calls"] == {"setsockopt": 2, "getsockopt": 1, "ioctl": 1, "close": 1, "socket": 1}


def test_above_0_b_the_c_side_is_the_warm_one_and_keeps_its_last_getsockopt() -> None:
    ours, c = syscalls.parse(_trace(PYTHON, C), [1 << 20])
    assert (c["impl"], c["untimed"], c["total"]) == ("c-warm", 2, 7)


def test_threads_are_told_apart_by_strace_prefix() -> None:
    trace = _trace(PYTHON, C).replace("700 ", "[pid   700] ")
    assert [e["total"] for e in syscalls.parse(trace, [0])] == [7, 6]


def test_a_trace_without_every_marked_cycle_is_an_error() -> None:
    with pytest.raises(BenchmarkError, match="holds 1 marked cycles, 4 expected") as caught:
        syscalls.parse(_trace(PYTHON), [0, 4096])
    assert caught.value.part == "syscalls"


def _counts(impl: str, options: dict[str, int]) -> Syscalls:
    return {"impl": impl, "queue_bytes": 0, "total": sum(options.values()), "calls": {"getsockopt": 1},
            "options": options, "untimed": 0}


def test_the_report_names_option_calls_only_one_side_makes() -> None:
    ours = _counts("sockrepair", {"getsockopt SOL_IP IP_TOS": 1, "setsockopt SOL_SOCKET SO_MARK": 3})
    same = _counts("c-options", {"getsockopt SOL_IP IP_TOS": 1, "setsockopt SOL_SOCKET SO_MARK": 3})
    assert report.option_differences(ours, same) == ({}, {})
    fewer = _counts("c-options", {"getsockopt SOL_IP IP_TOS": 1, "setsockopt SOL_SOCKET SO_MARK": 1,
                                  "getsockopt SOL_TCP TCP_CORK": 1})
    assert report.option_differences(ours, fewer) == ({"setsockopt SOL_SOCKET SO_MARK": 2},
                                                      {"getsockopt SOL_TCP TCP_CORK": 1})
    results = {"syscalls": [ours, fewer]}
    lines = report.syscalls_section(results)  # type: ignore[arg-type]
    assert ("- 0 B: sockrepair makes 2 option call(s) the like-for-like C does not (setsockopt SOL_SOCKET SO_MARK x2);"
            " it makes 1 sockrepair does not (getsockopt SOL_TCP TCP_CORK).") in lines
    assert report.syscalls_where(results, "c-options", 0) == (  # type: ignore[arg-type]
        "system calls per cycle: sockrepair 4 (getsockopt 1), like-for-like C 3 (getsockopt 1)")
