"""Finding criu and checking that it works on this kernel, with the known incompatibilities named.

The search order is $SOCKREPAIR_CRIU, then the per-machine install that `sockrepair criu setup` fills
(`installed_wrapper()`: $SOCKREPAIR_CRIU_PREFIX/bin/criu, by default /var/lib/sockrepair/criu/bin/criu), then PATH.
The per-machine place does not depend on where sockrepair itself is installed (a checkout, a venv, a wheel in
site-packages) nor on who asks: criu needs root to check, dump and restore, so the install is root's, and a
non-root `sockrepair check` still finds it."""

from __future__ import annotations

import fcntl
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.criu.explain import CATALOGUE, Finding, KnownError, Report, explain_text
from sockrepair.errors import CriuError

ENV_VAR = "SOCKREPAIR_CRIU"
PREFIX_VAR = "SOCKREPAIR_CRIU_PREFIX"
DEFAULT_PREFIX = Path("/var/lib/sockrepair/criu")
ORIGIN_MACHINE = "per-machine install"
SETUP_HINT = "run `sockrepair criu setup` as root to install criu >= 4.2 from Debian, or set $SOCKREPAIR_CRIU to one"
# criu < 4.2 reads SO_PASSCRED/SO_PASSSEC of TCP sockets, which kernels >= 6.16 refuse.
MIN_TCP_VERSION = (4, 2)
KERNEL_REFUSING_PASSSEC = (6, 16)
_TIMEOUT = 120


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def install_prefix() -> Path:
    """The per-machine directory `sockrepair criu setup` installs into: $SOCKREPAIR_CRIU_PREFIX when set, else
    DEFAULT_PREFIX. It holds bin/criu (the wrapper) and root/ (the unpacked Debian packages)."""
    env = os.environ.get(PREFIX_VAR)
    return Path(env) if env else DEFAULT_PREFIX


def installed_wrapper() -> Path:
    """`install_prefix()/bin/criu`, the second place `find_criu` looks (it may not exist)."""
    return install_prefix() / "bin" / "criu"


def kernel_version() -> tuple[int, ...]:
    """The running kernel's (major, minor, patch) from uname, e.g. (6, 18, 0)."""
    return _version_tuple(platform.release().split("-")[0])


_SIOCGIFFLAGS = 0x8913  # linux/sockios.h
_IFF_UP = 0x1  # linux/if.h


def loopback_up() -> bool:
    """Whether `lo` is up in this thread's network namespace (SIOCGIFFLAGS). criu tests TCP_REPAIR over 127.0.0.1
    before every command: with lo down and no address (a namespace fresh from `ip netns add`) its connect fails at
    once; with lo set down after it had its address, the connect waits out its SYN retries (about 2 minutes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        except OSError:
            return False  # no lo at all: nothing criu could connect over either
    return bool(struct.unpack_from("16sH", raw)[1] & _IFF_UP)


def _catalogue(key: str) -> KnownError:
    return next(k for k in CATALOGUE if k.key == key)


@dataclass(frozen=True)
class CheckResult:
    """`Criu.check()`'s verdict: `reason` is one line (criu's last line when ok), `fix` is empty when ok, `output`
    is what `criu check` printed, `report` the known errors found in it."""

    ok: bool
    reason: str
    fix: str
    output: str
    report: Report


@dataclass(frozen=True)
class Criu:
    """A criu binary (or wrapper) and how it was found; `argv` is the command prefix to run it."""

    argv: tuple[str, ...]
    origin: str
    version: str

    @property
    def path(self) -> str:
        return self.argv[0]

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return _version_tuple(self.version)

    def run(self, args: list[str], timeout: float | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """`criu ARGS...` with stdout and stderr captured as text, whatever its exit status; `kwargs` go to
        subprocess.run. Raises CriuError when it cannot be started, subprocess.TimeoutExpired after `timeout` s."""
        try:
            return subprocess.run(
                [*self.argv, *args], check=False, capture_output=True, text=True, timeout=timeout, **kwargs
            )
        except OSError as exc:
            raise CriuError(f"cannot run criu ({self.path}): {exc.strerror}; fix: {SETUP_HINT}") from None

    def supports_network_lock_skip(self) -> bool:
        """Whether this criu takes `--network-lock skip` (criu 4.2 has it, undocumented in --help): criu checks the
        option's value while parsing, so an unknown one fails even `criu --version`."""
        try:
            done = self.run(["--network-lock", "skip", "--version"], timeout=30)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def tcp_problem(self) -> KnownError | None:
        """The known failure this criu will hit on TCP sockets on this kernel, judged by versions alone; None when
        there is none."""
        if kernel_version()[:2] >= KERNEL_REFUSING_PASSSEC and self.version_tuple < MIN_TCP_VERSION:
            return _catalogue("so-passsec")
        return None

    def check(self) -> CheckResult:
        """`criu check` plus the version rule for TCP on this kernel (`criu check` passes on criu 4.1 here, whose
        TCP dumps fail on kernels >= 6.16); the known errors in its output give reason and fix. Not ok without root.
        Never raises for a failing criu; CriuError only when it cannot be started."""
        if os.geteuid() != 0:
            return CheckResult(False, "`criu check` needs root", "run as root", "", Report())
        if not loopback_up():
            known = _catalogue("loopback-down")
            report = Report([Finding(known, "lo is down (SIOCGIFFLAGS)", "sockrepair", 0)])
            return CheckResult(False, f"{known.summary}: {known.cause}", known.fix, "", report)
        try:
            done = self.run(["check"], timeout=_TIMEOUT)
        except subprocess.TimeoutExpired:
            return CheckResult(False, f"`criu check` did not finish in {_TIMEOUT} s", SETUP_HINT, "", Report())
        output = (done.stdout + done.stderr).strip()
        report = explain_text(output, "criu check")
        problems = report.problems
        tcp = self.tcp_problem()
        if problems:
            first = problems[0].known
            return CheckResult(False, f"{first.summary}: {first.cause}", first.fix, output, report)
        if done.returncode != 0:
            last = output.splitlines()[-1] if output else f"exit status {done.returncode}"
            return CheckResult(False, f"`criu check` failed: {last}", SETUP_HINT, output, report)
        if tcp is not None:
            return CheckResult(
                False, f"criu {self.version} on kernel {platform.release()}: {tcp.summary}", tcp.fix, output, report
            )
        return CheckResult(True, output.splitlines()[-1] if output else "ok", "", output, report)

    def require_working(self) -> Criu:
        """Self when `check()` passes; raises CriuError with its reason and fix otherwise."""
        result = self.check()
        if not result.ok:
            raise CriuError(f"criu {self.version} ({self.path}, from {self.origin}) is not usable: {result.reason}; "
                            f"fix: {result.fix}")
        return self


def candidates() -> list[tuple[str, str]]:
    """(origin, path) of every criu there is to try, in search order: $SOCKREPAIR_CRIU when set, the per-machine
    wrapper when it exists, `criu` on PATH when there is one."""
    found = []
    env = os.environ.get(ENV_VAR)
    if env:
        found.append((f"${ENV_VAR}", env))
    wrapper = installed_wrapper()
    if wrapper.exists():
        found.append((ORIGIN_MACHINE, str(wrapper)))
    on_path = shutil.which("criu")
    if on_path:
        found.append(("PATH", on_path))
    return found


def probe(origin: str, path: str) -> Criu | str:
    """The criu at `path` (a file, or a name looked up on PATH) with its version, or one line saying why it cannot
    be run (without the fix). Does not run `criu check`."""
    resolved = shutil.which(path) if os.sep not in path else path
    if resolved is None or not os.access(resolved, os.X_OK):
        return f"criu from {origin} ({path}) is not an executable file"
    try:
        done = subprocess.run([resolved, "--version"], check=False, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"`{resolved} --version` hung"
    except OSError as exc:
        return f"criu from {origin} ({resolved}) cannot be started: {exc.strerror}"
    found = re.search(r"Version:\s*(\S+)", done.stdout)
    if done.returncode != 0 or found is None:
        said = (done.stderr or done.stdout).strip().splitlines()
        return f"criu from {origin} ({resolved}) does not run: {said[-1] if said else done.returncode}"
    return Criu((resolved,), origin, found.group(1))


def _search() -> Criu | str:
    """The first criu that runs, or why none does: a set $SOCKREPAIR_CRIU that does not run ends the search."""
    found = candidates()
    if not found:
        return f"criu not found (no ${ENV_VAR}, nothing at {installed_wrapper()}, none on PATH)"
    reasons = []
    for origin, path in found:
        criu = probe(origin, path)
        if isinstance(criu, Criu) or origin.startswith("$"):
            return criu
        reasons.append(criu)
    return "; ".join(reasons)


def find_criu() -> Criu:
    """The first criu that runs (`--version` answers) of: $SOCKREPAIR_CRIU, `installed_wrapper()` (where
    `sockrepair criu setup` puts it), `criu` on PATH. A set $SOCKREPAIR_CRIU that does not run is an error, not
    skipped. Whether it works on this kernel is `Criu.check()`'s question.

    Raises CriuError naming every candidate tried and why it failed, and the fix (SETUP_HINT)."""
    found = _search()
    if isinstance(found, str):
        raise CriuError(f"{found}; fix: {SETUP_HINT}")
    return found


def criu_status() -> dict[str, Any]:
    """What `sockrepair check` reports about criu: {found, path, origin, version, check_ok, reason, fix}; `reason`
    never repeats `fix`. Never raises for a missing or broken criu."""
    found = _search()
    if isinstance(found, str):
        return {"found": False, "path": None, "origin": None, "version": None, "check_ok": False,
                "reason": found, "fix": SETUP_HINT}
    result = found.check()
    return {"found": True, "path": found.path, "origin": found.origin, "version": found.version,
            "check_ok": result.ok, "reason": result.reason, "fix": result.fix}
