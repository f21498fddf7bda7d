"""The machine a run was measured on, recorded next to its numbers: CPU, kernel, OS, Python, compiler, criu."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sockrepair.bench.cref import COMPILERS


def _first_line(argv: list[str]) -> str | None:
    """First line a tool prints about itself, or None when it is missing or fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (done.stdout or done.stderr).strip()
    return out.splitlines()[0] if done.returncode == 0 and out else None


def _cpuinfo() -> tuple[str | None, bool]:
    """CPU model name, and whether the kernel runs under a hypervisor (figures from a VM vary more)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, False
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    return (model.group(1).strip() if model else None), bool(flags and "hypervisor" in flags.group(1).split())


def _os_name() -> str | None:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    found = re.search(r'^PRETTY_NAME="?([^"\n]+)"?$', text, re.MULTILINE)
    return found.group(1) if found else None


def compiler_version() -> str | None:
    found = next((path for name in COMPILERS if (path := shutil.which(name))), None)
    return _first_line([found, "--version"]) if found else None


def criu_version() -> str | None:
    """The criu the benchmarks drive: sockrepair's choice (the project prefix's, then PATH's), not PATH's alone."""
    from sockrepair.criu.locate import find_criu
    from sockrepair.errors import CriuError

    try:
        found = find_criu()
    except CriuError:
        return None
    return f"{found.version} ({found.origin})"


def describe() -> dict[str, Any]:
    cpu, virtual = _cpuinfo()
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "virtualized": virtual,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "compiler": compiler_version(),
        "criu": criu_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
