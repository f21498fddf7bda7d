"""Starting the plain programs the tests migrate, and talking to them."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Sequence

from sockrepair.lab.programs import ECHO_SERVER


def start_echo(listen: str | None = None, extra_env: dict[str, str] | None = None,
               prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    argv = [*prefix, sys.executable, str(ECHO_SERVER)] + (["--listen", listen] if listen else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=extra_env)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("ready"):
        proc.kill()
        raise AssertionError(f"echo server did not start: {line!r}")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])
