"""Finding criu ($SOCKREPAIR_CRIU, then the project prefix that scripts/setup_criu.py fills, then PATH) and checking
that it works on this kernel, with the known incompatibilities named."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.criu.explain import CATALOGUE, KnownError, Report, explain_text
from sockrepair.errors import CriuError

ENV_VAR = "SOCKREPAIR_CRIU"
PREFIX_WRAPPER = Path(__file__).resolve().parents[2] / ".prefix" / "bin" / "criu"
SETUP_HINT = "run `python3 scripts/setup_criu.py` as root (fetches criu 4.2 into .prefix/), or set $SOCKREPAIR_CRIU"
# criu < 4.2 reads SO_PASSCRED/SO_PASSSEC of TCP sockets, which kernels >= 6.16 refuse.
MIN_TCP_VERSION = (4, 2)
KERNEL_REFUSING_PASSSEC = (6, 16)
_TIMEOUT = 120


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def kernel_version() -> tuple[int, ...]:
    return _version_tuple(platform.release().split("-")[0])


def _catalogue(key: str) -> KnownError:
    return next(k for k in CATALOGUE if k.key == key)


@dataclass(frozen=True)
class CheckResult:
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
        """The known failure this criu will hit on TCP sockets on this kernel, judged by versions alone."""
        if kernel_version()[:2] >= KERNEL_REFUSING_PASSSEC and self.version_tuple < MIN_TCP_VERSION:
            return _catalogue("so-passsec")
        return None

    def check(self) -> CheckResult:
        """`criu check` plus the version rule for TCP on this kernel (`criu check` passes on criu 4.1 here)."""
        if os.geteuid() != 0:
            return CheckResult(False, "`criu check` needs root", "run as root", "", Report())
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
        """Self when `check()` passes, else a CriuError with its cause and fix."""
        result = self.check()
        if not result.ok:
            raise CriuError(f"criu {self.version} ({self.path}, from {self.origin}) is not usable: {result.reason}; "
                            f"fix: {result.fix}")
        return self


def _candidates() -> list[tuple[str, str]]:
    found = []
    env = os.environ.get(ENV_VAR)
    if env:
        found.append((f"${ENV_VAR}", env))
    if PREFIX_WRAPPER.exists():
        found.append(("project prefix", str(PREFIX_WRAPPER)))
    on_path = shutil.which("criu")
    if on_path:
        found.append(("PATH", on_path))
    return found


def _probe(origin: str, path: str) -> Criu:
    resolved = shutil.which(path) if os.sep not in path else path
    if resolved is None or not os.access(resolved, os.X_OK):
        raise CriuError(f"criu from {origin} ({path}) is not an executable file; fix: {SETUP_HINT}")
    criu = Criu((resolved,), origin, "")
    try:
        done = criu.run(["--version"], timeout=30)
    except subprocess.TimeoutExpired:
        raise CriuError(f"`{resolved} --version` hung; fix: {SETUP_HINT}") from None
    found = re.search(r"Version:\s*(\S+)", done.stdout)
    if done.returncode != 0 or found is None:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise CriuError(f"criu from {origin} ({resolved}) does not run: {said[-1] if said else done.returncode}; "
                        f"fix: {SETUP_HINT}")
    return Criu((resolved,), origin, found.group(1))


def find_criu() -> Criu:
    """The first criu of $SOCKREPAIR_CRIU, the project prefix, PATH that runs (a set $SOCKREPAIR_CRIU must)."""
    candidates = _candidates()
    if not candidates:
        raise CriuError(f"criu not found (no ${ENV_VAR}, no {PREFIX_WRAPPER}, none on PATH); fix: {SETUP_HINT}")
    errors = []
    for origin, path in candidates:
        try:
            return _probe(origin, path)
        except CriuError as exc:
            if origin.startswith("$"):
                raise
            errors.append(str(exc))
    raise CriuError("; ".join(errors))


def criu_status() -> dict[str, Any]:
    """What `sockrepair check` reports about criu: found, path, origin, version, check_ok, reason, fix."""
    try:
        criu = find_criu()
    except CriuError as exc:
        return {"found": False, "path": None, "origin": None, "version": None, "check_ok": False,
                "reason": str(exc), "fix": SETUP_HINT}
    result = criu.check()
    return {"found": True, "path": criu.path, "origin": criu.origin, "version": criu.version,
            "check_ok": result.ok, "reason": result.reason, "fix": result.fix}
