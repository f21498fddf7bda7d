"""Repair mode on a bare fd, for code outside the engine: the probes of sockrepair/check.py, and the all-or-nothing
cleanup of sockrepair/move/land.py (a restored socket put back in repair mode closes without FIN or RST). The engine's
own steps use the methods of their session (sockrepair.engine._session)."""

from __future__ import annotations

from sockrepair.engine._ffi import lib
from sockrepair.engine._session import _Session


def repair_on(fd: int) -> None:
    """TCP_REPAIR = 1; errors as _Session.repair_on."""
    _Session(fd).repair_on()


def repair_off(fd: int, probe: bool) -> None:
    """Leave repair mode, with or without a window probe (see _Session.repair_off)."""
    _Session(fd).repair_off(probe)


def in_repair(fd: int) -> bool:
    """Whether the TCP socket `fd` is in repair mode (getsockopt TCP_REPAIR); errors as _Session.get."""
    return bool(_Session(fd).get(lib.IPPROTO_TCP, lib.TCP_REPAIR, "TCP_REPAIR"))
