"""sockrepair-criu.json: what `sockrepair criu dump` wrote into its directory (one criu image directory per tree),
how criu was run, which trees are restored, and which connections the lock covers with the trees each one waits
for. `sockrepair criu restore` (a later command, maybe after a reboot) reads it to lock again and restore."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sockrepair.errors import ImageError
from sockrepair.image.directory import load_json
from sockrepair.lock.locker import MAX_TTL
from sockrepair.private import create_private, open_dir, read_regular
from sockrepair.state import ConnTuple

MANIFEST = "sockrepair-criu.json"
VERSION = 1
LOCK_SKIP = "skip"  # criu run with --network-lock skip: the lock is sockrepair's alone
LOCK_CRIU = "criu"  # criu's own lock, sockrepair's held over it
_TMP = MANIFEST + ".tmp"
# A manifest of 1000 trees and 10000 connections is about 2 MB.
MAX_BYTES = 16 << 20
# manifest -> trees -> a tree -> its pids
MAX_DEPTH = 4
_DIR_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")


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
        """Atomically, 0600 (it names every connection), into a directory that must be the caller's and writable by
        nobody else (sockrepair.private.open_dir); the temporary file is created O_EXCL|O_NOFOLLOW next to it.
        Raises OSError (PermissionError when the directory is refused)."""
        fd = open_dir(directory, writing=True)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_TMP, dir_fd=fd)  # a crashed save's: ours, since nobody else can write here
            with create_private(fd, _TMP, "w") as f:
                json.dump(asdict(self), f, indent=2)
                f.write("\n")
            os.replace(_TMP, MANIFEST, src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)


def is_dump_dir(directory: Path) -> bool:
    """Whether `directory` was written by `sockrepair criu dump` (it holds the manifest)."""
    return (directory / MANIFEST).is_file()


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that true and false are not numbers here."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is(v, int) for v in value)


# field -> (its check, what the message says it must be)
_MANIFEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "criu_version": (lambda v: _is(v, str), "a string"),
    "network_lock": (lambda v: v in (LOCK_SKIP, LOCK_CRIU), f"{LOCK_SKIP!r} or {LOCK_CRIU!r}"),
    "ttl": (lambda v: _is(v, (int, float)) and 0 < v <= MAX_TTL, f"a number of seconds in (0, {MAX_TTL:g}]"),
    "netns": (lambda v: _is(v, int), "an inode number"),
    "trees": (lambda v: isinstance(v, list), "a list"),
    "connections": (lambda v: isinstance(v, list), "a list"),
    "created": (lambda v: _is(v, (int, float)), "a Unix time"),
    "version": (lambda v: v == VERSION, str(VERSION)),
}
_TREE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "root": (lambda v: _is(v, int) and 0 < v < 1 << 31, "a pid"),
    "dir": (lambda v: _is(v, str) and _DIR_NAME.fullmatch(v) is not None,
            "a directory name inside the dump (it points outside)"),
    "pids": (lambda v: _int_list(v) and v != [] and all(0 < p < 1 << 31 for p in v), "a list of pids"),
    "starttimes": (lambda v: _int_list(v) and all(t >= 0 for t in v), "a list of clock ticks"),
    "command": (lambda v: _is(v, str), "a string"),
    "shell_job": (lambda v: isinstance(v, bool), "true or false"),
    "dumped": (lambda v: isinstance(v, bool), "true or false"),
    "restored": (lambda v: isinstance(v, bool), "true or false"),
}
_CONNECTION_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tuple": (lambda v: _is(v, str), "a tuple ADDR:PORT->ADDR:PORT"),
    "waits_for": (lambda v: _int_list(v), "a list of root pids"),
    "peer": (lambda v: _is(v, str), "a string"),
}


def _checked(item: Any, fields: dict[str, tuple[Callable[[Any], bool], str]], where: str, path: Path) -> dict[str, Any]:
    """`item` when it is an object with exactly these fields, each passing its check; ImageError otherwise."""
    if not isinstance(item, dict):
        raise ImageError(f"{path}: malformed: {where} is {type(item).__name__}, not an object", path=str(path),
                         field=where or None)
    unknown = sorted(set(item) - set(fields))
    missing = sorted(set(fields) - set(item))
    if unknown or missing:
        what = "; ".join(x for x in (unknown and f"unknown {', '.join(map(repr, unknown))}",
                                     missing and f"missing {', '.join(missing)}") if x)
        raise ImageError(f"{path}: malformed: {where or 'the manifest'}: {what}", path=str(path), field=where or None)
    for name, (check, want) in fields.items():
        if not check(item[name]):
            field = f"{where}.{name}" if where else name
            raise ImageError(f"{path}: malformed: {field} must be {want}, not {item[name]!r:.60}", path=str(path),
                             field=field)
    return item


def load(directory: Path) -> Manifest:
    """The manifest of a `sockrepair criu dump` directory, every field checked. The directory must be the
    caller's or root's and writable by nobody else, the manifest a regular file of at most MAX_BYTES. Raises
    ImageError (`.path`, `.field`) when it is refused, missing, unreadable, of another version, malformed, or names
    a tree directory outside `directory`."""
    path = directory / MANIFEST
    try:
        fd = open_dir(directory)
        try:
            data = read_regular(MANIFEST, MAX_BYTES, fd, shown=path)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ImageError(
            f"{directory} holds no {MANIFEST}: not a directory written by `sockrepair criu dump`", path=str(path)
        ) from None
    except OSError as exc:
        raise ImageError(f"{exc.filename}: unreadable: {exc.strerror}", path=str(path)) from None
    try:
        raw = load_json(data, str(path), MAX_DEPTH)
    except ImageError as exc:
        raise ImageError(f"{path}: unreadable: {str(exc).removeprefix(f'{path}: ')}", path=str(path)) from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise ImageError(f"{path}: unsupported version {raw.get('version') if isinstance(raw, dict) else raw!r:.60}",
                         path=str(path), field="version")
    _checked(raw, _MANIFEST_FIELDS, "", path)
    trees = [TreeRecord(**_checked(t, _TREE_FIELDS, f"trees[{n}]", path)) for n, t in enumerate(raw.pop("trees"))]
    conns = [LockedConnection(**_checked(c, _CONNECTION_FIELDS, f"connections[{n}]", path))
             for n, c in enumerate(raw.pop("connections"))]
    for n, t in enumerate(trees):
        if len(t.starttimes) != len(t.pids):
            raise ImageError(f"{path}: malformed: trees[{n}] has {len(t.pids)} pids and {len(t.starttimes)} start "
                             "times", path=str(path), field=f"trees[{n}].starttimes")
    for n, c in enumerate(conns):
        try:
            ConnTuple.parse(c.tuple)
        except ValueError as exc:
            raise ImageError(f"{path}: malformed: connections[{n}].tuple: {exc}", path=str(path),
                             field=f"connections[{n}].tuple") from None
    return Manifest(trees=trees, connections=conns, **raw)
