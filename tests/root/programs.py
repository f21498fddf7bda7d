"""Helpers for the tests that talk to the lab's programs (started with sockrepair.lab.subjects)."""

from __future__ import annotations

import socket


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])
