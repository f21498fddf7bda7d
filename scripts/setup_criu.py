#!/usr/bin/env python3
"""Make a criu that works on this kernel available to sockrepair (stdlib only: runs before the venv exists).

Uses $SOCKREPAIR_CRIU, the project prefix's wrapper or a `criu` on PATH when one passes `criu check` and is new enough
for TCP sockets on this kernel. Otherwise it fetches Debian's criu (>= 4.2) and the libraries it depends on from a
newer Debian suite with `apt-get download` against a private apt state (the system's apt configuration and lists are
left untouched), unpacks them with `dpkg -x` into <repo>/.prefix/criu and writes <repo>/.prefix/bin/criu, a wrapper
that runs criu through the prefix's own dynamic loader and libraries.

The mirror is read from this machine's apt sources at run time, never written in the repo.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFIX = REPO / ".prefix"
CRIU_ROOT = PREFIX / "criu"
WRAPPER = PREFIX / "bin" / "criu"

# criu < 4.2 dumps SO_PASSCRED/SO_PASSSEC of TCP sockets, which kernels >= 6.16 refuse with EOPNOTSUPP.
MIN_VERSION_FOR_NEW_KERNELS = (4, 2)
KERNEL_REFUSING_PASSSEC = (6, 16)
# Suites tried in order (the most stable one that has a new enough criu wins); each is self-consistent, so pinning
# the chosen one makes every dependency come from it.
SUITES = ("trixie", "testing", "unstable")
SOURCES_FILES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class SetupError(Exception):
    """A step failed; the message says which and what to do."""


def log(msg: str) -> None:
    print(f"setup-criu: {msg}", flush=True)


def run(argv: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def kernel_version() -> tuple[int, ...]:
    return version_tuple(platform.release().split("-")[0])


def needed_version() -> tuple[int, ...]:
    return MIN_VERSION_FOR_NEW_KERNELS if kernel_version()[:2] >= KERNEL_REFUSING_PASSSEC else (3, 0)


def criu_problem(argv: list[str]) -> str | None:
    """Why this criu cannot be used here, or None when it can."""
    try:
        ver = run([*argv, "--version"], timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run: {exc}"
    found = re.search(r"Version:\s*(\S+)", ver.stdout)
    if ver.returncode != 0 or found is None:
        return f"`--version` failed: {(ver.stderr or ver.stdout).strip()[-300:]}"
    version = found.group(1)
    if version_tuple(version) < needed_version():
        want = ".".join(map(str, needed_version()))
        return f"version {version} < {want}: fails on TCP sockets on kernel {platform.release()} (SO_PASSSEC)"
    check = run([*argv, "check"], timeout=120)
    if check.returncode != 0:
        tail = (check.stderr + check.stdout).strip().splitlines()[-3:]
        return f"`criu check` failed (exit {check.returncode}): {' | '.join(tail)}"
    return None


def candidates() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    env = os.environ.get("SOCKREPAIR_CRIU")
    if env:
        found.append(("$SOCKREPAIR_CRIU", [env]))
    if WRAPPER.exists():
        found.append(("project prefix", [str(WRAPPER)]))
    on_path = shutil.which("criu")
    if on_path and Path(on_path).resolve() != WRAPPER.resolve():
        found.append(("PATH", [on_path]))
    return found


# --- the machine's Debian mirror --------------------------------------------------------------------------------


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _is_main_archive(suites: list[str]) -> bool:
    return any(not re.search(r"[-/](security|updates|backports)", s) and "/" not in s for s in suites)


def debian_mirror() -> tuple[str, str]:
    """(URI, keyring) of the machine's main Debian archive, from its apt sources."""
    for path in SOURCES_FILES:
        if not path.exists():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for st in _deb822_stanzas(text):
                if "deb" in st.get("types", "").split() and _is_main_archive(st.get("suites", "").split()):
                    signed = st.get("signed-by", "")
                    keyring = signed if signed.startswith("/") and "\n" not in signed else DEFAULT_KEYRING
                    return st["uris"].split()[0], keyring
        else:
            for line in text.splitlines():
                opts = re.match(r"\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if opts and _is_main_archive([opts.group(3)]):
                    signed_by = re.search(r"signed-by=(\S+?)[\s\]]", opts.group(1) or "")
                    return opts.group(2), signed_by.group(1) if signed_by else DEFAULT_KEYRING
    raise SetupError(
        "no Debian archive found in " + " or ".join(map(str, SOURCES_FILES)) + ": add one, or install criu >= 4.2 "
        "yourself and point $SOCKREPAIR_CRIU at it"
    )


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and cache under `root`: the system's apt state is untouched."""

    def __init__(self, root: Path, uri: str, keyring: str) -> None:
        self.root = root
        for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "status").write_text("")
        lines = [f"deb [signed-by={keyring}] {uri} {suite} main" for suite in SUITES]
        (root / "sources.list").write_text("\n".join(lines) + "\n")
        self.release = ""

    def options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc::sourcelist": r / "sources.list",
            "Dir::Etc::sourceparts": r / "sources.list.d",
            "Dir::Etc::preferences": r / "preferences",
            "Dir::Etc::preferencesparts": r / "preferences.d",
            "Dir::State::Lists": r / "lists",
            "Dir::State::status": r / "status",
            "Dir::Cache": r / "cache",
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            # the private dirs are root's; apt's _apt sandbox user could not write them
            "APT::Sandbox::User": "root",
            "APT::Default-Release": self.release,
        }
        return [arg for key, value in opts.items() for arg in ("-o", f"{key}={value}")]

    def call(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        done = run([tool, *self.options(), *args], cwd=cwd)
        if done.returncode != 0:
            raise SetupError(f"{tool} {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def choose_suite(self) -> tuple[str, str]:
        """(suite, version) of the most stable suite whose criu is new enough."""
        table = self.call("apt-cache", "madison", "criu")
        offers: dict[str, str] = {}
        for line in table.splitlines():
            cols = [c.strip() for c in line.split("|")]
            if len(cols) >= 3 and cols[0] == "criu":
                offers.setdefault(cols[2].split()[1].split("/")[0], cols[1])
        for suite in SUITES:
            version = offers.get(suite)
            if version and version_tuple(version.split(":")[-1]) >= MIN_VERSION_FOR_NEW_KERNELS:
                return suite, version
        raise SetupError(f"no Debian suite offers criu >= 4.2 (found: {offers or 'none'})")

    def closure(self, package: str) -> list[str]:
        """The package and everything it depends on, recursively (names only; virtual packages skipped)."""
        out = self.call(
            "apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
            "--no-breaks", "--no-replaces", "--no-enhances", package,
        )
        return sorted({line.strip() for line in out.splitlines() if line and not line[0].isspace() and "<" not in line})


def fetch() -> None:
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise SetupError(f"`{tool}` not found: fetching criu needs a Debian-based system with apt")
    uri, keyring = debian_mirror()
    log(f"fetching criu >= 4.2 from {uri} (suites tried: {', '.join(SUITES)})")
    PREFIX.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="criu-fetch-", dir=PREFIX) as tmp:
        work = Path(tmp)
        apt = PrivateApt(work / "apt", uri, keyring)
        apt.call("apt-get", "update")
        suite, version = apt.choose_suite()
        apt.release = suite
        packages = apt.closure("criu")
        log(f"criu {version} from {suite}; with {len(packages) - 1} dependencies: {' '.join(packages)}")
        debs = work / "debs"
        debs.mkdir()
        apt.call("apt-get", "download", *packages, cwd=debs)
        staging = work / "root"
        for deb in sorted(debs.glob("*.deb")):
            done = run(["dpkg", "-x", str(deb), str(staging)])
            if done.returncode != 0:
                raise SetupError(f"dpkg -x {deb.name} failed: {done.stderr.strip()}")
        if CRIU_ROOT.exists():
            shutil.rmtree(CRIU_ROOT)
        staging.rename(CRIU_ROOT)
    write_wrapper()


def write_wrapper() -> None:
    # The real file rather than a symlink to it (Debian also ships usr/lib64/ld-linux-x86-64.so.2 as a link).
    loaders = sorted((p for p in CRIU_ROOT.rglob("ld-linux*.so*") if p.is_file()), key=lambda p: (p.is_symlink(), p))
    if not loaders:
        raise SetupError(f"no dynamic loader (ld-linux*.so*) unpacked under {CRIU_ROOT}")
    # Directories holding shared libraries, found rather than assumed so any Debian architecture works.
    lib_dirs = sorted({p.parent for p in CRIU_ROOT.rglob("lib*.so*") if p.parent.name != "gconv"})
    rel = [os.path.relpath(p, CRIU_ROOT) for p in lib_dirs]
    WRAPPER.parent.mkdir(parents=True, exist_ok=True)
    # Paths are relative to the wrapper, so a moved checkout keeps working; only criu itself uses the prefix's
    # libc: the tools it starts (iptables, action scripts) run with the system's.
    WRAPPER.write_text(
        "#!/bin/sh\n"
        "# Written by scripts/setup_criu.py: criu from a newer Debian run with its own loader and libraries.\n"
        'P="$(cd "$(dirname "$(readlink -f "$0")")/../criu" && pwd)"\n'
        f'exec "$P/{os.path.relpath(loaders[0], CRIU_ROOT)}" --library-path '
        + '"' + ":".join(f"$P/{r}" for r in rel) + '" '
        + '"$P/usr/sbin/criu" "$@"\n'
    )
    WRAPPER.chmod(0o755)


def warn_if_overridden(origin: str) -> None:
    if origin != "$SOCKREPAIR_CRIU" and os.environ.get("SOCKREPAIR_CRIU"):
        log("warning: sockrepair uses $SOCKREPAIR_CRIU first: unset it to use this one")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch into the prefix even if a usable criu is present")
    args = parser.parse_args()
    if os.geteuid() != 0:
        log("must run as root (`criu check` and the install need it)")
        return 1
    try:
        for origin, argv in [] if args.force else candidates():
            problem = criu_problem(argv)
            if problem is None:
                log(f"using criu from {origin}: {argv[0]}")
                warn_if_overridden(origin)
                return 0
            log(f"criu from {origin} ({argv[0]}) is not usable: {problem}")
        fetch()
        problem = criu_problem([str(WRAPPER)])
        if problem is not None:
            raise SetupError(f"the fetched criu does not work here: {problem}")
        log(f"installed {WRAPPER} ({run([str(WRAPPER), '--version']).stdout.split()[1]}); `criu check` passed")
        warn_if_overridden("project prefix")
        return 0
    except (SetupError, subprocess.TimeoutExpired, OSError) as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
