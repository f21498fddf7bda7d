"""The journal of a move: before a source program is ended, every state it held is written into an image directory
and fsynced, so that whatever stops the mover afterwards (an exception, Ctrl-C, SIGKILL, a power cut on a disk-backed
directory), `sockrepair restore -D DIR` can complete the move while the lock still holds. The default journal, under
/run (cleared at boot), is written but not fsynced: a power cut ends the lock and the peers' connections with it.

migrate() packs the images into one file (journal.img, described by journal.json: creating a file per connection
costs tens of microseconds each, inside the freeze); `sockrepair dump` writes its usual directory (index.json and one
0600 image per connection, sockrepair.image.directory). load_states() reads either. The index's "source" records
what makes the images stale: the source's pid and start time (images of a program that is still running, or went on
after a `--leave-running` dump, no longer describe its connections), `after` ("kill" or "leave-running"), and
`lock_expires` (wall-clock seconds: once the lock is gone the peer has been answered by a reset, or by the program,
since). A completed move leaves a `completed` file: its images describe connections that
live elsewhere now. A restore that handed connections off but may not have unlocked them leaves a `handed` file
listing them: restoring those again would duplicate them, so a second restore only unlocks them (and restores the
others)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_IMODE, S_ISDIR, S_ISVTX, S_IWGRP, S_IWOTH
from typing import Any

from sockrepair.errors import ImageError
from sockrepair.image.directory import (
    INDEX,
    MAX_INDEX_BYTES,
    MAX_INDEX_DEPTH,
    Entry,
    load_json,
    read_dir,
    write_dir,
)
from sockrepair.move.procfs import stat
from sockrepair.private import open_dir, open_private, read_regular, replace_private
from sockrepair.state import ConnectionState

COMPLETED = "completed"
# written when the move passed its point of no return (the source is ended from then on): images without it are of a
# move that was undone, whose program went on with the connections
ENDED = "ended"
# a JSON list of the tuples (ADDR:PORT->ADDR:PORT text) a restore handed off to a program, before it unlocked them
HANDED = "handed"
JOURNAL_INDEX = "journal.json"
JOURNAL_IMAGES = "journal.img"
JOURNAL_VERSION = 1
# the packed images of one move: as much as image files of that many connections may hold (2 GiB each)
MAX_JOURNAL_BYTES = 64 << 30
WAIT_TIMEOUT = 30.0
DEFAULT_PARENT = Path("/run/sockrepair")


def _parents() -> tuple[Path, ...]:
    return DEFAULT_PARENT, Path(tempfile.gettempdir())


# an unheld journal younger than this may be a move's that has not taken its hold yet (hold_directory)
ABANDONED_AFTER = 60.0


def new_directory(pid: int) -> Path:
    """A fresh 0700 directory for the journal of one move of process `pid`, /run/sockrepair/move-PID-XXXXXXXX (or
    in the system's temporary directory when /run cannot be written): pending_journals() finds it. The journals of
    earlier moves killed before their point of no return go first (sweep_abandoned)."""
    for parent in _parents():
        with contextlib.suppress(OSError):
            parent.mkdir(mode=0o700, exist_ok=True)
            sweep_abandoned(parent)
            return Path(tempfile.mkdtemp(prefix=f"move-{pid}-", dir=parent))
    raise OSError(f"cannot create a journal directory under {DEFAULT_PARENT} or {tempfile.gettempdir()}")


def given_directory(path: str | Path) -> Path:
    """migrate()'s `journal=` argument, checked before anything is frozen: created 0700 when missing (its parents
    too), else a real directory of the caller's that nobody else can write (sockrepair.private.open_dir: whoever can
    write there can swap the images a later `sockrepair restore -D` puts into live connections), under parents
    nobody else can write either unless they are sticky (/tmp). Returns it. Raises ImageError (`.path`) naming why
    it cannot hold a journal."""
    if not isinstance(path, Path) and not path:
        # Path("") is ".": the journal would land in whatever the current directory is
        raise ImageError("journal='': an empty path names no directory", path="")
    directory = Path(path)
    try:
        # the parents first: nothing is made under one that is refused
        for parent in directory.resolve().parents:
            try:
                mode = os.stat(parent).st_mode
            except FileNotFoundError:
                continue  # made below, 0700
            # without the sticky bit, whoever can write the parent can rename the journal away and put theirs there
            if mode & (S_IWGRP | S_IWOTH) and not mode & S_ISVTX:
                raise ImageError(f"{directory}: cannot hold a move's journal: {parent} is writable by others "
                                 f"(mode {S_IMODE(mode):04o}, no sticky bit): anyone can swap the journal; use a "
                                 "directory whose parents only you can write", path=str(directory))
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(open_dir(directory, writing=True))
    except OSError as exc:
        why = "not a directory" if exc.errno in (errno.EEXIST, errno.ENOTDIR) else exc.strerror or str(exc)
        raise ImageError(f"{directory}: cannot hold a move's journal: {why}", path=str(directory)) from None
    return directory


def sweep_abandoned(parent: Path) -> list[Path]:
    """Remove the journals in `parent` that nothing will restore, held by no mover or guard and older than
    ABANDONED_AFTER: those of moves killed before their point of no return (no ENDED file, and _undone: their
    programs went on with the connections, the guard thawed them), and those a `sockrepair restore -D` completed
    (COMPLETED: it marks, never removes, the directory it was given), and what a move killed while it removed its
    completed journal left (REMOVED_PREFIX), whatever its age. All hold payload bytes. A journal with ENDED
    and without COMPLETED is kept whatever its age: it is how its connections come back; so is one without ENDED
    whose source is gone and whose lock still holds. Only directories of the caller's are
    looked at (when /run cannot be written `parent` is the system's temporary directory, shared with every user).
    Returns what was removed; what cannot be removed stays."""
    removed: list[Path] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        directory = parent / name
        try:
            removed_half = name.startswith(REMOVED_PREFIX + "move-")  # mark_completed() killed while it removed
            if not name.startswith("move-") and not removed_half:
                continue
            st = directory.lstat()
            # the fallback parent is the system's temporary directory: another user's move-* there is not ours
            if not S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            if removed_half:
                shutil.rmtree(directory)
                removed.append(directory)
                continue
            if now - st.st_mtime < ABANDONED_AFTER or _held(directory):
                continue
            if not (directory / COMPLETED).exists() and ((directory / ENDED).exists() or not _undone(directory, now)):
                continue
            shutil.rmtree(directory)
        except OSError:
            continue
        removed.append(directory)
    return removed


def _undone(directory: Path, now: float) -> bool:
    """Whether the journal of a move without ENDED is sure to restore nothing: none was written yet, its source
    program is still running (the move was undone and the program went on), or its lock expired (the peers met
    resets since). Otherwise the mover may have died between telling its guard to end the source and writing
    ENDED: those images are the connections' only copy (`restore -D --force`)."""
    if not (directory / JOURNAL_INDEX).exists():
        return True
    try:
        src = read_source(directory)
    except ImageError:
        return False
    if src.pid is not None and src.start_time is not None:
        st = stat(src.pid)
        if st is not None and st.starttime == src.start_time and not st.zombie:
            return True
    return src.lock_expires is not None and now > src.lock_expires


@dataclass(frozen=True)
class Pending:
    """A journal new_directory() made that no restore completed: `directory`, `source` (read_source), `connections`
    (how many it holds, those already handed off included), `stale` (stale_reason: None when `sockrepair restore
    -D` would restore it), `in_progress` (a mover or its guard holds it: hold_directory)."""

    directory: Path
    source: Source
    connections: int
    stale: str | None
    in_progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "pid": self.source.pid, "netns": self.source.netns,
                "lock_expires": self.source.lock_expires, "connections": self.connections, "stale": self.stale,
                "in_progress": self.in_progress}


def _held(directory: Path) -> bool:
    """Whether a move holds `directory` now (hold_directory), tried without waiting and let go at once."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def pending_journals() -> list[Pending]:
    """The journals of moves that stopped half-way (migrate() killed after it ended its source, or failed after
    that), in /run/sockrepair and the system's temporary directory, oldest first: each left by a move that did not
    complete (a completed move removes its journal). A journal that cannot be read is listed with `stale` saying
    why."""
    found: list[Pending] = []
    for parent in dict.fromkeys(_parents()):
        try:
            names = sorted(os.listdir(parent))
        except FileNotFoundError:
            continue
        # any other error (EACCES for a user who is not root) passes: not "nothing pending" when nothing was seen
        for name in names:
            directory = parent / name
            if not name.startswith("move-") or not (directory / JOURNAL_INDEX).exists():
                continue
            if (directory / COMPLETED).exists():
                continue
            try:
                src = read_source(directory)  # checks the directory first
                count = len(_journal_index(directory / JOURNAL_INDEX)["connections"])
                found.append(Pending(directory, src, count, stale_reason(directory), _held(directory)))
            except ImageError as exc:
                found.append(Pending(directory, Source(None, None, None, None, None, None), 0, f"unreadable: {exc}"))
    found.sort(key=lambda p: p.directory.stat().st_mtime if p.directory.exists() else 0.0)
    return found


def volatile(directory: Path) -> bool:
    """Whether `directory` is one of the default parent's (/run/sockrepair/move-*, or any other directory there the
    caller named): /run is cleared at boot (FHS
    3.0, 3.15), so a journal there cannot outlive a power cut whatever is fsynced, and fsyncing it only buys stalls
    inside the freeze (85-325 ms in about one move of ten where /run is a disk, as on this machine). A journal the
    caller placed anywhere else is fsynced: it may be meant to survive a reboot."""
    try:
        return directory.resolve().parent == DEFAULT_PARENT.resolve()
    except OSError:
        return False


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def namespace_at(path: str, netns: str | None = None) -> tuple[str | None, int | None]:
    """The `ip netns` name and the inode of the network namespace at `path` (/proc/PID/ns/net,
    /proc/thread-self/ns/net, /run/netns/NAME): `netns` when given, else the name in /run/netns that is the same
    namespace (None: it has none, as the host's own usually); the inode None when `path` cannot be read. A restore
    compares the inode with the namespace it restores into: a name alone cannot say "here" (the mover's namespace
    may be one only `ip netns exec` had entered, nameless to a restore run elsewhere)."""
    try:
        ns = os.stat(path)
    except OSError:
        return netns, None
    if netns is None:
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir("/run/netns")):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/run/netns/{name}")
                    if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
                        netns = name
                        break
    return netns, ns.st_ino


def _source(pid: int, after: str, ttl: float, namespace: tuple[str | None, int | None]) -> dict[str, Any]:
    st = stat(pid)
    return {"pid": pid, "command": st.comm if st is not None else None, "host": socket.gethostname(),
            "start_time": st.starttime if st is not None else None, "after": after,
            "lock_expires": time.time() + ttl, "netns": namespace[0], "netns_inode": namespace[1]}


def write_images(directory: Path, pid: int, pairs: Sequence[tuple[int, ConnectionState]], *, after: str,
                 ttl: float, dir_fd: int | None = None) -> list[Entry]:
    """`sockrepair dump`'s directory: write `pairs` ((the process's fd, state)) as index.json and one 0600 image per
    connection (sockrepair.image.directory.write_dir, which fsyncs every file and the directory; `dir_fd` is its
    prepare_dir fd), recording the source's identity and the lock's expiry (now + `ttl` seconds). Raises OSError
    (cannot write) or ImageError (a state an image cannot hold, a directory that is not safe to write)."""
    return write_dir(directory, list(pairs), _source(pid, after, ttl, namespace_at(f"/proc/{pid}/ns/net")), dir_fd)


@dataclass(frozen=True)
class JournalHead:
    """What write_journal() records besides the connections, and whether it fsyncs, found before the freeze
    (journal_head()): the source's identity, its namespace's name and inode (a listing of /run/netns), whether the
    directory is volatile(); 0.4 ms of file system calls that need not wait inside the downtime."""

    source: dict[str, Any]
    durable: bool


def journal_head(directory: Path, pid: int, netns: str | None) -> JournalHead:
    """The JournalHead of a journal in `directory` for process `pid`, restored into `netns` (None: this thread's
    namespace)."""
    namespace = namespace_at(f"/run/netns/{netns}" if netns else "/proc/thread-self/ns/net", netns)
    return JournalHead(_source(pid, "kill", 0.0, namespace), not volatile(directory))


def write_journal(directory: Path, pid: int, fds: Sequence[int], images: Sequence[bytes], tuples: Sequence[object],
                  *, ttl: float, netns: str | None, head: JournalHead | None = None) -> None:
    """migrate()'s journal: the connection images (`images[i]` of the process's fd `fds[i]`, connection
    `tuples[i]`) packed in one 0600 file, journal.img, and described by journal.json (offset, length and sha256 of
    each, and the source as write_images records it, the lock expiring `ttl` seconds from now), both fsynced with
    the directory unless the directory is volatile() (under /run, which a reboot clears): one file, not one per
    connection, because creating files costs tens of microseconds each inside the freeze. `head`: journal_head() of
    the same directory, process and namespace, found earlier (None: found now). load_states() reads it back.
    Raises OSError when the directory cannot be written."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        (directory / COMPLETED).unlink()
    if head is None:
        head = journal_head(directory, pid, netns)
    durable = head.durable
    connections = []
    offset = 0
    for fd, image, conn in zip(fds, images, tuples):
        connections.append({"fd": fd, "tuple": str(conn), "offset": offset, "length": len(image),
                            "sha256": hashlib.sha256(image).hexdigest()})
        offset += len(image)
    with open_private(directory / JOURNAL_IMAGES) as f:
        f.write(b"".join(images))
        if durable:
            f.flush()
            os.fsync(f.fileno())
    now = time.time()
    index = {"version": JOURNAL_VERSION, "created": now, "source": {**head.source, "lock_expires": now + ttl},
             "connections": connections}
    with open_private(directory / JOURNAL_INDEX) as f:
        # compact: the C encoder (an indent runs the pure-Python one, milliseconds for 1,000 connections)
        f.write(json.dumps(index, separators=(",", ":")).encode())
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if durable:
        _fsync_path(directory, os.O_DIRECTORY)


def append_journal(directory: Path, fds: Sequence[int], images: Sequence[bytes], tuples: Sequence[object]) -> None:
    """More connections for the journal write_journal() wrote in `directory` (migrate()'s connections that waited
    in an accept queue: `fds[i]` is image.directory.NO_FD for those): their images appended to journal.img (0600 already, opened
    without following a symlink), then journal.json replaced whole (replace_private; both fsynced unless the
    directory is volatile()). Whatever fails leaves the journal's earlier connections as they were: their bytes are
    not rewritten, and the old index stays until the new one is complete. Raises OSError, and ImageError for an
    unreadable index."""
    durable = not volatile(directory)
    index = _journal_index(directory / JOURNAL_INDEX)
    fd = os.open(directory / JOURNAL_IMAGES, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "wb") as f:
        offset = os.fstat(fd).st_size
        for conn_fd, image, conn in zip(fds, images, tuples, strict=True):
            index["connections"].append({"fd": conn_fd, "tuple": str(conn), "offset": offset, "length": len(image),
                                         "sha256": hashlib.sha256(image).hexdigest()})
            offset += len(image)
        f.write(b"".join(images))
        if durable:
            f.flush()
            os.fsync(f.fileno())
    replace_private(directory, JOURNAL_INDEX, json.dumps(index, separators=(",", ":")).encode(), durable)


def _check_dir(directory: Path) -> None:
    """The rules every image directory is read under (sockrepair.private.open_dir): not a symlink, the caller's or
    root's, not writable by group or others. Raises ImageError (`.path`)."""
    try:
        os.close(open_dir(directory))
    except OSError as exc:
        raise _unopened(directory, exc) from None


def _unopened(directory: Path, exc: OSError) -> ImageError:
    """The ImageError for a directory that could not be opened; the kernel's EACCES (open_dir's own refusals are
    EPERM) to a user who is not root says what to do: the journals are root's."""
    why = exc.strerror
    if exc.errno == errno.EACCES and os.geteuid() != 0:
        why = f"{why} (a journal root wrote: run as root)"
    return ImageError(f"{directory}: {why}", path=str(directory))


def _read_json(path: Path) -> Any:
    """An index read as untrusted input: a regular file of at most MAX_INDEX_BYTES, JSON nested at most
    MAX_INDEX_DEPTH deep. Raises ImageError (`.path`)."""
    try:
        data = read_regular(path, MAX_INDEX_BYTES)
    except OSError as exc:
        raise ImageError(f"{path}: unreadable: {exc.strerror}", path=str(path)) from None
    return load_json(data, str(path), MAX_INDEX_DEPTH)


def _journal_index(index_path: Path) -> dict[str, Any]:
    """journal.json read and checked as far as its shape goes: an object of this JOURNAL_VERSION whose
    "connections" is a list (set to [] when absent). Raises ImageError (`.path`, `.field`)."""
    index = _read_json(index_path)
    if not isinstance(index, dict) or index.get("version") != JOURNAL_VERSION:
        raise ImageError(f"{index_path}: unsupported journal version", path=str(index_path), field="version")
    index.setdefault("connections", [])
    if not isinstance(index["connections"], list):
        raise ImageError(f"{index_path}: connections is not a list", path=str(index_path), field="connections")
    return index


def _index_path(directory: Path) -> Path:
    packed = directory / JOURNAL_INDEX
    return packed if packed.exists() else directory / INDEX


def load_states(directory: Path) -> list[ConnectionState]:
    """The states of a journal (journal.json and journal.img) or of a `sockrepair dump` directory, in order. Raises
    ImageError with `.path`, `.field` (e.g. "connections[2].sha256") and, for a damaged image, `.offset` (the byte
    in journal.img)."""
    index_path = directory / JOURNAL_INDEX
    if not index_path.exists():
        return [state for _, state in read_dir(directory)]
    images_path = directory / JOURNAL_IMAGES
    _check_dir(directory)
    connections = _journal_index(index_path)["connections"]
    try:
        blob = read_regular(images_path, MAX_JOURNAL_BYTES)
    except OSError as exc:
        raise ImageError(f"{images_path}: unreadable journal: {exc.strerror}", path=str(images_path)) from None
    states = []
    for n, item in enumerate(connections):
        try:
            start, length, digest = int(item["offset"]), int(item["length"]), str(item["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"{index_path}: bad connection entry {item!r}: {exc}", path=str(index_path),
                             field=f"connections[{n}]") from None
        image = blob[start : start + length]
        if len(image) != length or hashlib.sha256(image).hexdigest() != digest:
            raise ImageError(f"{images_path}: image {n} differs from the journal's index (damaged or cut short)",
                             path=str(images_path), offset=start, field=f"connections[{n}].sha256")
        try:
            states.append(ConnectionState.from_bytes(image))
        except ImageError as exc:
            raise ImageError(f"{images_path}: image {n}: {exc}", path=str(images_path),
                             offset=start + (exc.offset or 0), field=exc.field) from None
    return states


def mark_ended(directory: Path, durable: bool | None = None) -> None:
    """The move passed its point of no return: its source is being ended (fsynced when `durable`, so that a crash
    right after still leaves the images restorable). `durable`: JournalHead.durable of `directory`, found before
    the freeze (volatile() takes some 75 us, inside it); None: not volatile(directory), found now."""
    if durable is None:
        durable = not volatile(directory)
    with open_private(directory / ENDED) as f:
        f.write(f"{time.time():.3f}\n".encode())
        if durable:
            f.flush()
            os.fsync(f.fileno())


# a journal the move created, renamed at once when the move completed and then removed: killed in the middle of
# the removal, what is left under this prefix is no journal (restore --pending, completed(), the sweep)
REMOVED_PREFIX = ".completed-"


def mark_completed(directory: Path, created: bool) -> None:
    """The move is done: a directory the journal created is renamed out of the journals' names (one step: a guard
    that reads completed() meanwhile never finds it half removed) and removed, one the caller gave gets a
    `completed` file, so that no restore brings the connections back a second time."""
    if created:
        gone = directory.with_name(REMOVED_PREFIX + directory.name)
        try:
            os.rename(directory, gone)
        except OSError:
            gone = directory
        shutil.rmtree(gone, ignore_errors=True)
        return
    with open_private(directory / COMPLETED) as f:
        f.write(f"{time.time():.3f}\n".encode())


def completed(directory: Path) -> bool:
    """Whether mark_completed() ran for `directory`: gone (the journal had created it) or holding COMPLETED."""
    return not directory.is_dir() or (directory / COMPLETED).exists()


def mark_handed(directory: Path, tuples: Sequence[object]) -> None:
    """These connections (`tuples`, with those already recorded) are in a program now: a later restore of
    `directory` must not make them again, only unlock them. Written to a temporary name, fsynced and renamed, so that
    a crash leaves the old list or the new one."""
    names = sorted(read_handed(directory) | {str(t) for t in tuples})
    replace_private(directory, HANDED, json.dumps(names).encode())


def read_handed(directory: Path) -> set[str]:
    """The tuples (text) mark_handed() recorded in `directory` (none: empty). Raises ImageError (`.path`) for a file
    that is not a JSON list of strings."""
    path = directory / HANDED
    if not path.exists():
        return set()
    names = _read_json(path)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ImageError(f"{path}: not a list of connections", path=str(path))
    return set(names)


def discard_journal(directory: Path, created: bool) -> None:
    """The move failed before the source was ended (it goes on): the journal no longer describes its
    connections."""
    if created:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for name in (JOURNAL_INDEX, JOURNAL_IMAGES):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


def hold_directory(directory: Path) -> int:
    """An open fd on `directory` holding an exclusive flock(2) on it, for the whole move: a child forked meanwhile
    (the guard, sockrepair.move.freeze) that keeps the fd keeps the lock, which the kernel releases when the last
    of them is gone; the directory is created (0700) if missing. Raises OSError when another move holds it."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, f"{directory} is the journal of a move still in progress") from None
    return fd


def wait_free(directory: Path, timeout: float = WAIT_TIMEOUT) -> int:
    """Wait (at most `timeout` seconds) until no move holds `directory` (hold_directory): a mover killed a moment
    ago may have left its guard still saving the connections there. Returns the fd holding the lock now. Raises
    ImageError (`.path`) when the directory cannot be opened or the wait runs out."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _unopened(directory, exc) from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise ImageError(f"{directory} is still held by a move in progress (or its guard) after "
                                 f"{timeout:g} s: try again once it ended", path=str(directory)) from None
            time.sleep(0.01)


def note_relock(directory: Path, expires: float) -> None:
    """The connections of `directory` were locked again until `expires` (wall-clock seconds), after a restore whose
    handoff failed: its index says so, so that a retry before then is not refused as stale."""
    path = _index_path(directory)
    index = json.loads(path.read_text())
    index.setdefault("source", {})["lock_expires"] = expires
    with open_private(path) as f:
        f.write(json.dumps(index, indent=2).encode())
        f.flush()
        os.fsync(f.fileno())
    with contextlib.suppress(FileNotFoundError):
        (directory / COMPLETED).unlink()


@dataclass(frozen=True)
class Source:
    """What an image directory's index says of its source (fields None when an older dump did not record them)."""

    pid: int | None
    start_time: int | None
    after: str | None
    lock_expires: float | None
    netns: str | None
    netns_inode: int | None  # the namespace's inode (namespace_at): the one to restore into


def read_source(directory: Path) -> Source:
    """What the journal's (or dump's) index says of the source. Raises ImageError (`.path`) when the index cannot be
    read (load_states says more about what is wrong)."""
    path = _index_path(directory)
    _check_dir(directory)
    index = _read_json(path)
    src = index.get("source", {}) if isinstance(index, dict) else {}
    if not isinstance(src, dict):
        src = {}

    def typed(key: str, kind: type | tuple[type, ...]) -> Any:
        value = src.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return Source(typed("pid", int), typed("start_time", int), typed("after", str), typed("lock_expires", (int, float)),
                  typed("netns", str), typed("netns_inode", int))


def stale_reason(directory: Path, now: float | None = None) -> str | None:
    """Why restoring `directory` would bring back connections that have moved on since (None: it would not, as far
    as the index tells): the move completed; the source program is still running (a `--leave-running` dump, or a
    move stopped before the source was ended, which went on); or the lock expired, after which the peers' packets
    met a reset or the program."""
    if (directory / COMPLETED).exists():
        return "this move completed: its connections live on elsewhere"
    src = read_source(directory)
    if src.pid is not None and src.start_time is not None:
        st = stat(src.pid)
        if st is not None and st.starttime == src.start_time and not st.zombie:
            return (f"the source process {src.pid} is still running, so its connections went on after these "
                    "images were written")
    if src.after == "leave-running":
        return "the dump left the program running: its connections went on after these images were written"
    if src.after == "kill" and not (directory / ENDED).exists():
        return ("the move was undone before its source was ended: the program went on with these connections "
                "(if you know it was ended, --force)")
    now = time.time() if now is None else now
    if src.lock_expires is not None and now > src.lock_expires:
        return (f"the lock expired {now - src.lock_expires:.0f} s ago: what the peers sent since was answered "
                "with a reset or is lost")
    return None
