"""sockrepair-criu.json: written privately and atomically, read back exactly, and refused when it is not ours."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sockrepair.criu.manifest import (
    MANIFEST,
    LockedConnection,
    Manifest,
    TreeRecord,
    is_dump_dir,
    load,
)
from sockrepair.errors import ImageError


def manifest() -> Manifest:
    return Manifest(
        criu_version="4.2.1", network_lock="skip", ttl=600.0, netns=4026531840,
        trees=[TreeRecord(100, "tree-100", [100, 101], [5, 6], "server", False, dumped=True),
               TreeRecord(200, "tree-200", [200], [7], "client", True)],
        connections=[LockedConnection("127.0.0.1:7022->127.0.0.1:40000", [100, 200], "tree")],
    )


def test_round_trip_is_exact_and_private(tmp_path: Path) -> None:
    made = manifest()
    made.save(tmp_path)
    assert is_dump_dir(tmp_path)
    assert stat.S_IMODE((tmp_path / MANIFEST).stat().st_mode) == 0o600
    assert load(tmp_path) == made
    assert not list(tmp_path.glob("*.tmp"))


def test_tree_lookup_names_the_roots_it_has(tmp_path: Path) -> None:
    made = manifest()
    assert made.tree(200).command == "client"
    with pytest.raises(ImageError, match="no tree with root 300 .*roots: 100, 200"):
        made.tree(300)


def test_not_a_dump_directory(tmp_path: Path) -> None:
    assert not is_dump_dir(tmp_path)
    with pytest.raises(ImageError, match="not a directory written by `sockrepair criu dump`"):
        load(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=9), "unsupported version 9"),
        (lambda d: d["trees"][0].update(dir="../etc"), "points outside"),
        (lambda d: d["connections"][0].update(tuple="nonsense"), "malformed"),
        (lambda d: d.pop("ttl"), "malformed"),
    ],
)
def test_damaged_manifests_are_refused(tmp_path: Path, change: object, message: str) -> None:
    manifest().save(tmp_path)
    raw = json.loads((tmp_path / MANIFEST).read_text())
    change(raw)  # type: ignore[operator]
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ImageError, match=message):
        load(tmp_path)


def test_unreadable_json_is_an_image_error(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(ImageError, match="unreadable"):
        load(tmp_path)
