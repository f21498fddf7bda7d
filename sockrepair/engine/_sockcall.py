"""One-shot calls on a bare fd, for code outside the engine that probes or measures a socket without a session
(sockrepair/check.py, sockrepair/bench/bench_engine.py). Each call makes a session of its own; the engine's steps
share one (sockrepair.engine._session)."""

from __future__ import annotations

from sockrepair.engine._session import _Session


def set_u32(fd: int, level: int, opt: int, value: int, name: str) -> None:
    _Session(fd).set_u32(level, opt, value, name)


def ioctl_int(fd: int, request: int, name: str) -> int:
    return _Session(fd).ioctl(request, name)
