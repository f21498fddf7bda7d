"""A directory of connection images: one 0600 file per connection plus index.json saying what each one is."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.errors import ImageError
from sockrepair.private import open_private
from sockrepair.state import ConnectionState, ConnTuple

INDEX = "index.json"
INDEX_VERSION = 1


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


def _write_private(path: Path, data: bytes) -> None:
    with open_private(path) as f:
        f.write(data)


def write_dir(directory: Path, states: list[tuple[int, ConnectionState]], source: dict[str, Any]) -> list[Entry]:
    """Write (fd, state) pairs as conn-N.img files and index.json (all 0600, the directory 0700 when created);
    `source` (pid, command, host...) is recorded in the index for people. Raises ImageError (naming the field) for
    a state an image cannot hold, OSError when the directory cannot be written."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    entries = []
    for n, (fd, state) in enumerate(states):
        data = state.to_bytes()
        name = f"conn-{n}.img"
        _write_private(directory / name, data)
        entries.append(Entry(name, fd, state.tuple, hashlib.sha256(data).hexdigest()))
    index = {"version": INDEX_VERSION, "created": time.time(), "source": source,
             "connections": [e.to_dict() for e in entries]}
    _write_private(directory / INDEX, json.dumps(index, indent=2).encode())
    return entries


def read_dir(directory: Path) -> list[tuple[Entry, ConnectionState]]:
    """The (entry, state) pairs of a directory write_dir made, in the index's order. Raises ImageError with `.path`
    (the index or the image file at fault), `.field` (the index key, e.g. "connections[2].sha256", or the image's
    record path) and, for a damaged image, `.offset` (the byte in that file)."""
    index_path = directory / INDEX
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise ImageError(f"{directory} holds no {INDEX}: not an image directory written by `sockrepair dump`",
                         path=str(index_path)) from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{index_path}: unreadable: {exc}", path=str(index_path)) from None
    version = index.get("version") if isinstance(index, dict) else None
    if version != INDEX_VERSION:
        raise ImageError(f"{index_path}: unsupported index version {version!r}", path=str(index_path),
                         field="version")
    connections = index.get("connections", [])
    if not isinstance(connections, list):
        raise ImageError(f"{index_path}: connections is not a list", path=str(index_path), field="connections")
    out = []
    for n, item in enumerate(connections):
        try:
            entry = Entry(item["file"], int(item["fd"]), ConnTuple.parse(item["tuple"]), item["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"{index_path}: bad connection entry {item!r}: {exc}", path=str(index_path),
                             field=f"connections[{n}]") from None
        if "/" in entry.file or entry.file.startswith("."):
            raise ImageError(f"{index_path}: image name {entry.file!r} points outside the directory",
                             path=str(index_path), field=f"connections[{n}].file")
        image_path = directory / entry.file
        try:
            data = image_path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{image_path}: {exc.strerror}", path=str(image_path)) from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ImageError(f"{image_path}: sha256 differs from the index (file changed or damaged)",
                             path=str(image_path), field=f"connections[{n}].sha256")
        try:
            state = ConnectionState.from_bytes(data)
        except ImageError as exc:
            raise ImageError(f"{image_path}: {exc}", path=str(image_path), offset=exc.offset,
                             field=exc.field) from None
        out.append((entry, state))
    return out


def read_image(path: Path) -> ConnectionState:
    """The state in one image file (`sockrepair show`); unreadable or malformed: ImageError with `.path`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror}", path=str(path)) from None
    try:
        return ConnectionState.from_bytes(data)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}", path=str(path), offset=exc.offset, field=exc.field) from None
