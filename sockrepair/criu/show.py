"""The connections in criu images: a plain criu image directory, or a `sockrepair criu dump` directory (one image
directory per tree plus sockrepair-criu.json), as ConnectionStates and as text or JSON for `sockrepair criu show`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockrepair.criu.images import load_connections
from sockrepair.criu.manifest import LOCK_SKIP, Manifest, is_dump_dir, load
from sockrepair.errors import ImageError
from sockrepair.image.text import state_lines
from sockrepair.state import ConnectionState


@dataclass
class TreeImages:
    """One image directory's connections; `root`, `command` and `restored` are None/"" for a plain criu directory."""

    dir: Path
    root: int | None
    command: str
    restored: bool | None
    connections: list[ConnectionState]


def read_images(directory: Path) -> tuple[Manifest | None, list[TreeImages]]:
    """(manifest, trees) of a `sockrepair criu dump` directory (its dumped trees only), or (None, [the directory])
    for a plain criu image directory. Raises ImageError when it is not a directory or its images are malformed."""
    if not directory.is_dir():
        raise ImageError(f"{directory} is not a directory")
    if not is_dump_dir(directory):
        return None, [TreeImages(directory, None, "", None, load_connections(directory))]
    manifest = load(directory)
    trees = [TreeImages(directory / t.dir, t.root, t.command, t.restored, load_connections(directory / t.dir))
             for t in manifest.trees if t.dumped]
    return manifest, trees


def load_states(directory: Path) -> list[ConnectionState]:
    """Every TCP connection of the directory's images, whatever tree it belongs to."""
    _, trees = read_images(directory)
    return [state for tree in trees for state in tree.connections]


def to_dict(directory: Path, payload: bool = False) -> dict[str, Any]:
    """`sockrepair criu show --json`: {directory, dump (None for plain criu images), trees: [{dir, root, command,
    restored, connections}]}, each connection as ConnectionState.to_dict (queue bytes only with `payload`)."""
    manifest, trees = read_images(directory)
    return {
        "directory": str(directory),
        "dump": None if manifest is None else {
            "criu_version": manifest.criu_version, "network_lock": manifest.network_lock, "ttl": manifest.ttl,
            "created": manifest.created, "locked_connections": len(manifest.connections)},
        "trees": [{"dir": str(t.dir), "root": t.root, "command": t.command, "restored": t.restored,
                   "connections": [s.to_dict(payload=payload) for s in t.connections]} for t in trees],
    }


def to_text(directory: Path) -> str:
    """`sockrepair criu show`: the dump, then per tree its connections, four lines each. Raises as read_images."""
    manifest, trees = read_images(directory)
    out = []
    if manifest is not None:
        lock = "sockrepair only (--network-lock skip)" if manifest.network_lock == LOCK_SKIP else "criu + sockrepair"
        out.append(f"sockrepair criu dump of {len(manifest.trees)} tree(s) by criu {manifest.criu_version}, lock "
                   f"{lock}, ttl {manifest.ttl:g} s")
    for tree in trees:
        if tree.root is not None:
            done = "restored" if tree.restored else "not restored yet"
            out.append(f"tree {tree.root} ({tree.command}), {tree.dir.name}: {len(tree.connections)} connection(s), "
                       f"{done}")
        else:
            out.append(f"{tree.dir}: {len(tree.connections)} connection(s)")
        for s in tree.connections:
            out.extend(state_lines(s, "  "))
    return "\n".join(out)
