"""Making a criu that works on this kernel available: `sockrepair criu setup`.

A criu that `find_criu` already finds and whose `Criu.check()` passes ($SOCKREPAIR_CRIU, the per-machine install,
PATH) is kept. Otherwise Debian's criu (>= 4.2) and the libraries it depends on are fetched from a newer Debian suite
with `apt-get download` against a private apt state (the system's apt configuration, lists and dpkg status are left
untouched), unpacked with `dpkg -x` into `install_prefix()/root`, and `install_prefix()/bin/criu` is written: a
wrapper that runs criu through that root's own dynamic loader and libraries. The mirror is read from this machine's
apt sources at run time, never written in the package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sockrepair.criu.explain import HOST_PROBLEMS
from sockrepair.criu.locate import (
    ENV_VAR,
    MIN_TCP_VERSION,
    ORIGIN_MACHINE,
    Criu,
    candidates,
    install_prefix,
    probe,
)
from sockrepair.errors import CriuError

# Suites tried in order (the most stable one that has a new enough criu wins); each is self-consistent, so pinning
# the chosen one makes every dependency come from it.
SUITES = ("trixie", "testing", "unstable")
SOURCES_FILES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
TOOLS = ("apt-get", "apt-cache", "dpkg")
# apt-get update and download of ~30 MB from a slow mirror.
_STEP_TIMEOUT = 600


@dataclass
class SetupResult:
    """What `setup` did: the working `criu` (origin and version included), whether it was `fetched` now, why each
    criu found before was passed over, and warnings (a $SOCKREPAIR_CRIU that `find_criu` would prefer)."""

    criu: Criu
    fetched: bool
    passed_over: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, timeout=_STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        step = " ".join(argv[:2])
        raise CriuError(f"`{step} ...` did not finish in {_STEP_TIMEOUT} s: is the mirror reachable?") from None


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


def debian_mirror(sources: tuple[Path, ...] = SOURCES_FILES) -> tuple[str, str]:
    """(URI, keyring path) of the machine's main Debian archive: the first `deb` entry of `sources` (deb822
    `*.sources` or one-line `sources.list`) that is not -security/-updates/-backports, with its Signed-By keyring
    (Debian's archive keyring when none). Raises CriuError when there is none."""
    for path in sources:
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
    raise CriuError(
        "no Debian archive found in " + " or ".join(map(str, sources)) + ": add one, or install criu >= 4.2 "
        f"yourself and point ${ENV_VAR} at it"
    )


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


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
        """`-o KEY=VALUE` arguments pointing every apt path at `root`, and pinning `release` when set."""
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
        """`tool` (apt-get or apt-cache) with the private options; its stdout. Raises CriuError when it fails."""
        done = _run([tool, *self.options(), *args], cwd=cwd)
        if done.returncode != 0:
            said = done.stderr.strip().splitlines()
            raise CriuError(f"{tool} {' '.join(args)} failed: {said[-1] if said else f'exit {done.returncode}'}")
        return done.stdout

    def choose_suite(self) -> tuple[str, str]:
        """(suite, Debian version) of the most stable of SUITES whose criu is >= 4.2. Raises CriuError when none."""
        table = self.call("apt-cache", "madison", "criu")
        offers: dict[str, str] = {}
        for line in table.splitlines():
            cols = [c.strip() for c in line.split("|")]
            if len(cols) >= 3 and cols[0] == "criu":
                offers.setdefault(cols[2].split()[1].split("/")[0], cols[1])
        for suite in SUITES:
            version = offers.get(suite)
            if version and _version_tuple(version.split(":")[-1]) >= MIN_TCP_VERSION:
                return suite, version
        raise CriuError(f"no Debian suite offers criu >= 4.2 (found: {offers or 'none'})")

    def closure(self, package: str) -> list[str]:
        """The package and everything it depends on, recursively (names only; virtual packages skipped)."""
        out = self.call(
            "apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
            "--no-breaks", "--no-replaces", "--no-enhances", package,
        )
        return sorted({line.strip() for line in out.splitlines() if line and not line[0].isspace() and "<" not in line})


# --- fetching and installing ------------------------------------------------------------------------------------


def fetch(prefix: Path, progress: Callable[[str], None]) -> Path:
    """Download criu >= 4.2 and its dependency closure into `prefix`/root (replaced whole) and write the wrapper;
    returns the wrapper's path. Raises CriuError when apt or dpkg is missing or a step fails."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise CriuError(f"`{tool}` not found: fetching criu needs a Debian-based system with apt; or install "
                            f"criu >= 4.2 yourself and point ${ENV_VAR} at it")
    uri, keyring = debian_mirror()
    progress(f"fetching criu >= 4.2 from {uri} (suites tried: {', '.join(SUITES)}) into {prefix}")
    prefix.mkdir(parents=True, exist_ok=True)
    # Staged next to its final place so the move into it is a rename.
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=prefix) as tmp:
        work = Path(tmp)
        apt = PrivateApt(work / "apt", uri, keyring)
        apt.call("apt-get", "update")
        suite, version = apt.choose_suite()
        apt.release = suite
        packages = apt.closure("criu")
        progress(f"criu {version} from {suite}, with {len(packages) - 1} dependencies: {' '.join(packages)}")
        debs = work / "debs"
        debs.mkdir()
        apt.call("apt-get", "download", *packages, cwd=debs)
        staging = work / "root"
        for deb in sorted(debs.glob("*.deb")):
            done = _run(["dpkg", "-x", str(deb), str(staging)])
            if done.returncode != 0:
                raise CriuError(f"dpkg -x {deb.name} failed: {done.stderr.strip()}")
        root = prefix / "root"
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    return write_wrapper(prefix)


def write_wrapper(prefix: Path) -> Path:
    """Write `prefix`/bin/criu (0755), which runs `prefix`/root/usr/sbin/criu with that root's dynamic loader and
    libraries; returns its path. Raises CriuError when the root holds no loader."""
    root = prefix / "root"
    # The real file rather than a symlink to it (Debian also ships usr/lib64/ld-linux-x86-64.so.2 as a link).
    loaders = sorted((p for p in root.rglob("ld-linux*.so*") if p.is_file()), key=lambda p: (p.is_symlink(), p))
    if not loaders:
        raise CriuError(f"no dynamic loader (ld-linux*.so*) unpacked under {root}")
    # Directories holding shared libraries, found rather than assumed so any Debian architecture works.
    lib_dirs = sorted({p.parent for p in root.rglob("lib*.so*") if p.parent.name != "gconv"})
    rel = [os.path.relpath(p, root) for p in lib_dirs]
    wrapper = prefix / "bin" / "criu"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    # Paths are relative to the wrapper, so a moved prefix keeps working; only criu itself uses the root's libc:
    # the tools it starts (iptables, action scripts) run with the system's.
    text = (
        "#!/bin/sh\n"
        "# Written by `sockrepair criu setup`: criu from a newer Debian run with its own loader and libraries.\n"
        'P="$(cd "$(dirname "$(readlink -f "$0")")/../root" && pwd)"\n'
        f'exec "$P/{os.path.relpath(loaders[0], root)}" --library-path '
        + '"' + ":".join(f"$P/{r}" for r in rel) + '" '
        + '"$P/usr/sbin/criu" "$@"\n'
    )
    tmp = wrapper.with_name("criu.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, wrapper)
    return wrapper


def _override_warning(origin: str) -> list[str]:
    if origin != f"${ENV_VAR}" and os.environ.get(ENV_VAR):
        return [f"sockrepair uses ${ENV_VAR} first: unset it to use this one"]
    return []


def setup(*, force: bool = False, progress: Callable[[str], None] = lambda _msg: None) -> SetupResult:
    """Keep the first criu `find_criu` would find whose `Criu.check()` passes; otherwise (or with `force`) fetch
    one into `install_prefix()` and check it. `progress` gets one line per step. Needs root (`criu check` does).

    Raises CriuError (one line: the step, the cause, what to do) when not root, when apt/dpkg are missing, a
    download fails, or the fetched criu does not pass `criu check` either. Filesystem errors are OSError."""
    if os.geteuid() != 0:
        raise CriuError("`sockrepair criu setup` must run as root (`criu check` needs it)")
    passed_over: list[str] = []
    for origin, path in [] if force else candidates():
        found = probe(origin, path)
        if isinstance(found, Criu):
            result = found.check()
            if result.ok:
                return SetupResult(found, False, passed_over, _override_warning(origin))
            if HOST_PROBLEMS & set(result.report.keys):
                raise CriuError(f"criu {found.version} ({path}) fails here, and any other would: {result.reason}; "
                                f"fix: {result.fix}")
            found = f"criu {found.version} from {origin} ({path}) is not usable: {result.reason}"
        progress(found)
        passed_over.append(found)
    wrapper = fetch(install_prefix(), progress)
    fetched = probe(ORIGIN_MACHINE, str(wrapper))
    if isinstance(fetched, str):
        raise CriuError(f"the fetched criu does not run: {fetched}")
    result = fetched.check()
    if not result.ok:
        raise CriuError(f"the fetched criu {fetched.version} does not work here: {result.reason}")
    return SetupResult(fetched, True, passed_over, _override_warning(ORIGIN_MACHINE))
