"""sockrepair-criu.json: what `sockrepair criu dump` wrote into its directory (one criu image directory per tree),
how criu was run, which trees are restored, and which connections the lock covers with the trees each one waits
for. `sockrepair criu restore` (a later command, maybe after a reboot) reads it to lock again and restore."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sockrepair.errors import ImageError
from sockrepair.private import open_private
from sockrepair.state import ConnTuple

MANIFEST = "sockrepair-criu.json"
VERSION = 1
LOCK_SKIP = "skip"  # criu run with --network-lock skip: the lock is sockrepair's alone
LOCK_CRIU = "criu"  # criu's own lock, sockrepair's held over it


@dataclass
class TreeRecord:
    """One dumped tree: its root pid, image directory name (`tree-ROOT`), every pid with its start time (clock
    ticks since boot, /proc/PID/stat field 22: tells a reused pid apart), the root's command line, whether criu ran
    with --shell-job, and how far it got."""

    root: int
    dir: str
    pids: list[int]
    starttimes: list[int]
    command: str
    shell_job: bool
    dumped: bool = False
    restored: bool = False


@dataclass
class LockedConnection:
    """A tuple the lock covers and the trees (roots) that must all be restored before it may be released."""

    tuple: str
    waits_for: list[int]
    peer: str


@dataclass
class Manifest:
    """The whole record: criu's version and lock method, the lock's ttl (seconds), the trees' network namespace
    inode, the trees in dump order and the locked connections; `created` is a Unix time."""

    criu_version: str
    network_lock: str  # LOCK_SKIP or LOCK_CRIU
    ttl: float
    netns: int
    trees: list[TreeRecord]
    connections: list[LockedConnection]
    created: float = field(default_factory=time.time)
    version: int = VERSION

    def tree(self, root: int) -> TreeRecord:
        """The tree whose root pid is `root`; ImageError when there is none."""
        for t in self.trees:
            if t.root == root:
                return t
        raise ImageError(f"no tree with root {root} in this dump (roots: {', '.join(str(t.root) for t in self.trees)})")

    def save(self, directory: Path) -> None:
        """Atomically, 0600 (it names every connection)."""
        tmp = directory / (MANIFEST + ".tmp")
        with open_private(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")
        os.replace(tmp, directory / MANIFEST)


def is_dump_dir(directory: Path) -> bool:
    """Whether `directory` was written by `sockrepair criu dump` (it holds the manifest)."""
    return (directory / MANIFEST).is_file()


def load(directory: Path) -> Manifest:
    """The manifest of a `sockrepair criu dump` directory. Raises ImageError when it is missing, unreadable, of
    another version, malformed, or names a tree directory outside `directory`."""
    path = directory / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImageError(
            f"{directory} holds no {MANIFEST}: not a directory written by `sockrepair criu dump`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: unreadable: {exc}") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise ImageError(f"{path}: unsupported version {raw.get('version') if isinstance(raw, dict) else raw!r}")
    try:
        trees = [TreeRecord(**t) for t in raw.pop("trees")]
        conns = [LockedConnection(**c) for c in raw.pop("connections")]
        for c in conns:
            ConnTuple.parse(c.tuple)
        manifest = Manifest(trees=trees, connections=conns, **raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ImageError(f"{path}: malformed: {exc}") from None
    for t in manifest.trees:
        if "/" in t.dir or t.dir.startswith("."):
            raise ImageError(f"{path}: tree directory {t.dir!r} points outside {directory}")
    return manifest
