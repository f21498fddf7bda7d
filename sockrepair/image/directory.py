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
    """Write (fd, state) pairs; `source` (pid, command, host...) is recorded in the index for people."""
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
    try:
        index = json.loads((directory / INDEX).read_text())
    except FileNotFoundError:
        raise ImageError(f"{directory} holds no {INDEX}: not an image directory written by `sockrepair dump`") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{directory / INDEX}: unreadable: {exc}") from None
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        raise ImageError(f"{directory / INDEX}: unsupported index version {index.get('version')!r}")
    out = []
    for item in index.get("connections", []):
        try:
            entry = Entry(item["file"], int(item["fd"]), ConnTuple.parse(item["tuple"]), item["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"{directory / INDEX}: bad connection entry {item!r}: {exc}") from None
        if "/" in entry.file or entry.file.startswith("."):
            raise ImageError(f"{directory / INDEX}: image name {entry.file!r} points outside the directory")
        try:
            data = (directory / entry.file).read_bytes()
        except OSError as exc:
            raise ImageError(f"{directory / entry.file}: {exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ImageError(f"{directory / entry.file}: sha256 differs from the index (file changed or damaged)")
        out.append((entry, ConnectionState.from_bytes(data)))
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
