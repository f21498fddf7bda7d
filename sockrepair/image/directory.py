"""A directory of connection images: one 0600 file per connection plus index.json saying what each one is.

Directories and files go through sockrepair.private: the directory must be the caller's (not a symlink, not
writable by others) and empty when written to; files are created with O_NOFOLLOW|O_EXCL, and read back only as
regular files of bounded size, every field of the index checked before it is used."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sockrepair.errors import ImageError
from sockrepair.image._codec import HEADER_SIZE, MIN_SIZE
from sockrepair.image.layout import CHECKSUM_SIZE, MAGIC
from sockrepair.private import (
    create_private,
    make_dir,
    open_dir,
    open_regular,
    read_bounded,
)
from sockrepair.state import ConnectionState, ConnTuple

INDEX = "index.json"
# the fd of a connection the source process never held: one that waited in a listener's accept queue
NO_FD = -1
INDEX_PART = "index.json.part"
INDEX_VERSION = 1
# index.json of 10000 connections is about 1.5 MB: no dump is that big, and a bigger file is not ours.
MAX_INDEX_BYTES = 4 << 20
# The index is an object of objects ("source", each connection): deeper nesting is not an index.
MAX_INDEX_DEPTH = 4
# Queues beyond the largest socket buffers a kernel allows (net.core.wmem_max is an int) are not a connection.
MAX_IMAGE_BYTES = 1 << 31
_SHA256 = re.compile(r"[0-9a-f]{64}")
_IMAGE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")


@dataclass
class Entry:
    """One connection of the index: its image file's name, the fd it had in the source process, its tuple, and the
    sha256 (hex) of the image."""

    file: str
    fd: int
    tuple: ConnTuple
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "fd": self.fd, "tuple": str(self.tuple), "sha256": self.sha256}


def prepare_dir(directory: Path) -> int:
    """An fd of `directory`, ready for write_dir: created 0700 when missing; an existing one must be a real
    directory (not a symlink) of the caller's, not writable by group or others, and empty. Close the fd. Raises
    ImageError (`.path`) naming why it is refused, or OSError when it cannot be created."""
    try:
        return make_dir(directory)
    except (PermissionError, FileExistsError, NotADirectoryError) as exc:
        if isinstance(exc, FileExistsError) and _unfinished(directory):
            raise ImageError(f"{directory}: holds conn-N.img files and no index.json: a dump killed while writing "
                             "them (its program was let go and went on, so they are of no use): delete them, or give "
                             "another directory", path=str(directory)) from None
        if isinstance(exc, FileExistsError) and _has_index(directory):
            raise ImageError(f"{directory}: holds the images of an earlier dump: `sockrepair restore -D {directory}` "
                             "them (it says when they are stale), delete them, or give another directory",
                             path=str(directory)) from None
        raise ImageError(f"{directory}: {exc.strerror}", path=str(directory)) from None


_WRITTEN_NAME = re.compile(r"conn-\d+\.img")


def _has_index(directory: Path) -> bool:
    """Whether `directory` holds an index.json that is a regular file (lstat: a planted symlink is none)."""
    try:
        return stat.S_ISREG(os.lstat(directory / INDEX).st_mode)
    except OSError:
        return False


def _unfinished(directory: Path) -> bool:
    """Whether `directory` holds only what write_dir writes before its index: conn-N.img files (and the index
    under its temporary name)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return bool(names) and all(_WRITTEN_NAME.fullmatch(n) or n == INDEX_PART for n in names)


def write_dir(directory: Path, states: list[tuple[int, ConnectionState]], source: dict[str, Any],
              dir_fd: int | None = None) -> list[Entry]:
    """Write (fd, state) pairs as conn-N.img files, then index.json (all 0600, the directory 0700 when created);
    `source` (pid, command, host...) is recorded in the index for people. `dir_fd` is prepare_dir's fd of
    `directory` (None: prepare it here). Raises ImageError (naming the field) for a state an image cannot hold or a
    directory prepare_dir refuses, OSError when the directory cannot be written."""
    _refuse_twice([], states)
    own = dir_fd is None
    fd = prepare_dir(directory) if dir_fd is None else dir_fd
    try:
        index = {"version": INDEX_VERSION, "created": time.time(), "source": source, "connections": []}
        return _commit(fd, index, states)
    finally:
        if own:
            os.close(fd)


def append_dir(directory: Path, dir_fd: int, states: list[tuple[int, ConnectionState]]) -> list[Entry]:
    """More (fd, state) pairs for the directory write_dir() wrote (`dir_fd` its prepare_dir fd): conn-N.img files
    numbered on, then index.json replaced as write_dir writes it, so that a failure leaves the index as it was,
    naming only the images it did (the new ones are removed). Returns the new entries. Raises ImageError for an
    unreadable index or a state an image cannot hold, OSError when the directory cannot be written."""
    index_path = str(directory / INDEX)
    with open_regular(INDEX, dir_fd, shown=index_path) as f:
        index = load_json(read_bounded(f, MAX_INDEX_BYTES, index_path), index_path, MAX_INDEX_DEPTH)
    if not isinstance(index, dict) or not isinstance(index.get("connections"), list):
        raise ImageError(f"{index_path}: not an index write_dir wrote (no list of connections)", path=index_path)
    _refuse_twice([_entry(item, n, index_path).tuple for n, item in enumerate(index["connections"])], states)
    return _commit(dir_fd, index, states)


def _refuse_twice(listed: list[ConnTuple], states: list[tuple[int, ConnectionState]]) -> None:
    """Raise ImageError when a 4-tuple of `states` is one of `listed` (the index's) or of another of `states`: two
    sockets restored for one 4-tuple, the peer's packets would reach only one of them (read_dir refuses it)."""
    seen: dict[ConnTuple, int] = {}
    for n, conn in enumerate([*listed, *(state.tuple for _, state in states)]):
        first = seen.setdefault(conn.wire(), n)
        if first != n:
            raise ImageError(f"connections {first} and {n} are both {conn}: one image per connection",
                             field=f"connections[{n}]")


def _commit(dir_fd: int, index: dict[str, Any], states: list[tuple[int, ConnectionState]]) -> list[Entry]:
    """Write `states` as conn-N.img files numbered after the index's connections, add them to `index`, and write it
    as index.json; returns their entries."""
    written: list[str] = []
    try:
        entries = []
        for n, (sock_fd, state) in enumerate(states, len(index["connections"])):
            data = state.to_bytes()
            name = f"conn-{n}.img"
            written.append(name)
            _write_durably(dir_fd, name, data)
            entries.append(Entry(name, sock_fd, state.tuple, hashlib.sha256(data).hexdigest()))
        index["connections"] = [*index["connections"], *(e.to_dict() for e in entries)]
        # Written last, under another name, then renamed: index.json exists only whole, and only once every image
        # it names is on disk (a mover killed meanwhile leaves no index that a restore would half trust, or the
        # index it had).
        written.append(INDEX_PART)
        _write_durably(dir_fd, INDEX_PART, json.dumps(index, indent=2).encode())
        os.rename(INDEX_PART, INDEX, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        written = []
        os.fsync(dir_fd)
    except BaseException:
        # images without an index are of no use and would keep the directory from a second dump; a SIGKILL leaves
        # them, which prepare_dir recognises
        for name in written:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
        raise
    return entries


def _write_durably(dir_fd: int, name: str, data: bytes) -> None:
    with create_private(dir_fd, name) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in children)
    return deepest


def load_json(data: bytes, path: str, max_depth: int) -> Any:
    """Parse untrusted JSON: ImageError (`.path`) for bytes that are not UTF-8 JSON or nest deeper than
    `max_depth` lists/objects."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ImageError(f"{path}: JSON nested too deep (more than {max_depth} levels)", path=path) from None
    except ValueError as exc:
        raise ImageError(f"{path}: not JSON: {exc}", path=path) from None
    if _depth(value) > max_depth:
        raise ImageError(f"{path}: JSON nested too deep (more than {max_depth} levels)", path=path)
    return value


def _entry(item: Any, n: int, index_path: str) -> Entry:
    field = f"connections[{n}]"

    def bad(why: str, key: str | None = None) -> ImageError:
        return ImageError(f"{index_path}: bad connection entry {field}: {why}", path=index_path,
                          field=f"{field}.{key}" if key else field)

    if not isinstance(item, dict):
        raise bad(f"a JSON object is expected, not {type(item).__name__}")
    for key, kind in (("file", str), ("fd", int), ("tuple", str), ("sha256", str)):
        if key not in item:
            raise bad(f"no {key!r}", key)
        if not isinstance(item[key], kind) or isinstance(item[key], bool):
            raise bad(f"{key} is {type(item[key]).__name__}, not {kind.__name__}", key)
    name, fd = item["file"], item["fd"]
    if "/" in name or name.startswith("."):
        raise ImageError(f"{index_path}: image name {name!r} points outside the directory", path=index_path,
                         field=f"{field}.file")
    if not _IMAGE_NAME.fullmatch(name):
        raise bad(f"image name {name!r} is not a plain file name (letters, digits, '.', '_', '-')", "file")
    if fd != NO_FD and not 0 <= fd < 1 << 31:
        raise bad(f"fd {fd} is not a file descriptor number", "fd")
    if not _SHA256.fullmatch(item["sha256"]):
        raise bad("sha256 is not 64 lowercase hex digits", "sha256")
    try:
        conn = ConnTuple.parse(item["tuple"])
    except ValueError as exc:
        raise bad(str(exc), "tuple") from None
    return Entry(name, fd, conn, item["sha256"])


def _read_index(directory: Path, dir_fd: int) -> list[Entry]:
    index_path = str(directory / INDEX)
    try:
        with open_regular(INDEX, dir_fd, shown=index_path) as f:
            data = read_bounded(f, MAX_INDEX_BYTES, index_path)
    except FileNotFoundError:
        raise ImageError(f"{directory} holds no {INDEX}: not an image directory written by `sockrepair dump`",
                         path=index_path) from None
    except OSError as exc:
        raise ImageError(f"{index_path}: unreadable: {exc.strerror}", path=index_path) from None
    index = load_json(data, index_path, MAX_INDEX_DEPTH)
    if not isinstance(index, dict):
        raise ImageError(f"{index_path}: not an index: a JSON object is expected, not {type(index).__name__}",
                         path=index_path)
    version = index.get("version")
    if version != INDEX_VERSION or isinstance(version, bool):
        raise ImageError(f"{index_path}: unsupported index version {version!r}", path=index_path, field="version")
    connections = index.get("connections")
    if not isinstance(connections, list):
        raise ImageError(f"{index_path}: connections is missing or not a list", path=index_path, field="connections")
    if not connections:  # write_dir never writes one: a restore of it would do nothing and say nothing
        raise ImageError(f"{index_path}: lists no connection", path=index_path, field="connections")
    entries = [_entry(item, n, index_path) for n, item in enumerate(connections)]
    names = [e.file for e in entries]
    if len(set(names)) != len(names):
        raise ImageError(f"{index_path}: an image file is named twice", path=index_path, field="connections")
    return entries


def read_dir(directory: Path) -> list[tuple[Entry, ConnectionState]]:
    """The (entry, state) pairs of a directory write_dir made, in the index's order. The directory must be a real
    directory of the caller's or root's, not writable by group or others; index.json at most MAX_INDEX_BYTES, the
    images regular files. Raises ImageError with `.path` (the directory, the index or the image file at fault),
    `.field` (the index key, e.g. "connections[2].sha256", or the image's record path) and, for a damaged image,
    `.offset` (the byte in that file)."""
    try:
        dir_fd = open_dir(directory)
    except OSError as exc:
        raise ImageError(f"{directory}: {exc.strerror}", path=str(directory)) from None
    try:
        out: list[tuple[Entry, ConnectionState]] = []
        for n, entry in enumerate(_read_index(directory, dir_fd)):
            image_path = directory / entry.file
            data = _read_image_bytes(entry.file, image_path, dir_fd)
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ImageError(f"{image_path}: sha256 differs from the index (file changed or damaged)",
                                 path=str(image_path), field=f"connections[{n}].sha256")
            state = _decoded(data, image_path)
            if state.tuple != entry.tuple:
                raise ImageError(f"{image_path} holds {state.tuple}, the index says {entry.tuple}",
                                 path=str(directory / INDEX), field=f"connections[{n}].tuple")
            if any(state.tuple.wire() == seen.tuple.wire() for _, seen in out):
                # two sockets restored for one 4-tuple: the peer's packets would reach only one of them
                raise ImageError(f"{directory / INDEX}: {state.tuple} is listed twice", path=str(directory / INDEX),
                                 field=f"connections[{n}]")
            out.append((entry, state))
        return out
    finally:
        os.close(dir_fd)


def _read_exactly(f: IO[bytes], size: int, path: Path) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise ImageError(f"{path}: truncated: {len(data)} of {size} bytes (the file shrank while read)",
                         path=str(path))
    return data


def _read_image_bytes(name: str | Path, path: Path, dir_fd: int | None = None) -> bytes:
    """An image file's bytes: a regular file, its header read first, then exactly the body and checksum the header
    declares, which must be the rest of the file."""
    try:
        f = open_regular(name, dir_fd, shown=path)
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror}", path=str(path)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < MIN_SIZE:
            return f.read(MIN_SIZE)  # decode() names what is missing
        head = _read_exactly(f, HEADER_SIZE, path)
        version = int.from_bytes(head[4:6], "big")
        if head[: len(MAGIC)] != MAGIC:
            return head  # decode() names the wrong magic
        if version not in CHECKSUM_SIZE:
            return head + f.read(MIN_SIZE - HEADER_SIZE)  # decode() names the version it does not read
        body_len = int.from_bytes(head[8:12], "big")
        total = HEADER_SIZE + body_len + CHECKSUM_SIZE[version]
        if total > size:
            raise ImageError(f"{path}: truncated: the header declares a {body_len}-byte body, so {total} bytes, "
                             f"not {size}", path=str(path), offset=size)
        if total < size:
            raise ImageError(f"{path}: {size - total} bytes of trailing junk after the image", path=str(path),
                             offset=total)
        if total > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: {total} bytes, more than any connection image ({MAX_IMAGE_BYTES})",
                             path=str(path), offset=8, field="body_len")
        return head + _read_exactly(f, total - HEADER_SIZE, path)


def _decoded(data: bytes, path: Path) -> ConnectionState:
    try:
        return ConnectionState.from_bytes(data)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}", path=str(path), offset=exc.offset, field=exc.field) from None


def read_image(path: Path) -> ConnectionState:
    """The state in one image file (`sockrepair show`): a regular file (not a symlink, FIFO or device), read as its
    header declares. Unreadable or malformed: ImageError with `.path`."""
    return _decoded(_read_image_bytes(path, path), path)
