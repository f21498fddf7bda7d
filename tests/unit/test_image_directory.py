"""Image directories (what `sockrepair dump` writes): a round trip, file modes, and errors naming the file, the
index key or the image's byte and field."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
from pathlib import Path

import pytest
import xxhash

from sockrepair.errors import ImageError
from sockrepair.image.directory import INDEX, NO_FD, append_dir, read_dir, write_dir
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)


def _state(port: int) -> ConnectionState:
    return ConnectionState(
        tuple=ConnTuple(socket.AF_INET, "10.0.0.1", port, "10.0.0.2", 443), tcp_state=1, send_seq=7, recv_seq=9,
        send_queue=b"hello world", unsent_len=5, recv_queue=b"abc", options=TcpOptions(1460, True, True, True, 7, 9),
        window=RepairWindow(1, 2, 3, 4, 5), timestamp=777, sockopts=SocketOptions(congestion="cubic"),
    )  # fmt: skip


@pytest.fixture
def written(tmp_path: Path) -> Path:
    directory = tmp_path / "dump"
    write_dir(directory, [(5, _state(40000)), (6, _state(40001))], {"pid": 1})
    return directory


def _edit_index(directory: Path, change: dict[str, object], entry: int | None = None) -> None:
    index = json.loads((directory / INDEX).read_text())
    (index if entry is None else index["connections"][entry]).update(change)
    (directory / INDEX).write_text(json.dumps(index))


def test_round_trip_and_modes(written: Path) -> None:
    pairs = read_dir(written)
    assert [(e.file, e.fd, s) for e, s in pairs] == [("conn-0.img", 5, _state(40000)), ("conn-1.img", 6, _state(40001))]
    assert stat.S_IMODE(written.stat().st_mode) == 0o700
    for name in ("conn-0.img", "conn-1.img", INDEX):
        assert stat.S_IMODE((written / name).stat().st_mode) == 0o600


def test_damaged_image_names_file_offset_and_field(written: Path) -> None:
    path = written / "conn-1.img"
    data = bytearray(path.read_bytes())
    struct.pack_into(">H", data, 13, 0)  # tuple.local_port
    struct.pack_into(">Q", data, len(data) - 8, xxhash.xxh3_64_intdigest(bytes(data[:-8])))  # version 3's trailer
    path.write_bytes(data)
    _edit_index(written, {"sha256": hashlib.sha256(data).hexdigest()}, entry=1)
    with pytest.raises(ImageError) as err:
        read_dir(written)
    assert (err.value.path, err.value.offset, err.value.field) == (str(path), 13, "tuple.local_port")
    assert str(err.value).startswith(f"{path}: bad connection image at byte 13: local_port is 0")


def test_changed_image_names_the_index_entry(written: Path) -> None:
    path = written / "conn-1.img"
    data = bytearray(path.read_bytes())
    data[20] ^= 1
    path.write_bytes(data)
    with pytest.raises(ImageError, match="sha256 differs from the index") as err:
        read_dir(written)
    assert (err.value.path, err.value.field, err.value.offset) == (str(path), "connections[1].sha256", None)


@pytest.mark.parametrize(
    ("change", "entry", "field", "message"),
    [
        ({"version": 2}, None, "version", "unsupported index version 2"),
        ({"connections": {}}, None, "connections", "connections is missing or not a list"),
        ({"connections": None}, None, "connections", "connections is missing or not a list"),
        ({"connections": []}, None, "connections", "lists no connection"),
        ({"file": "../conn-0.img"}, 0, "connections[0].file", "points outside the directory"),
        ({"tuple": "nonsense"}, 1, "connections[1].tuple", "bad connection entry"),
    ],
)
def test_bad_index_names_the_key(written: Path, change: dict[str, object], entry: int | None, field: str,
                                 message: str) -> None:
    _edit_index(written, change, entry)
    with pytest.raises(ImageError, match=message) as err:
        read_dir(written)
    assert (err.value.path, err.value.field) == (str(written / INDEX), field)


def test_index_that_is_not_an_object(written: Path) -> None:
    (written / INDEX).write_text("[1, 2]")
    with pytest.raises(ImageError, match="not an index: a JSON object is expected, not list") as err:
        read_dir(written)
    assert err.value.path == str(written / INDEX)


def test_missing_index_and_missing_image(tmp_path: Path, written: Path) -> None:
    with pytest.raises(ImageError, match="not an image directory") as err:
        read_dir(tmp_path)
    assert err.value.path == str(tmp_path / INDEX)
    (written / "conn-0.img").unlink()
    with pytest.raises(ImageError, match="No such file") as err:
        read_dir(written)
    assert err.value.path == str(written / "conn-0.img")


def test_the_index_must_agree_with_its_images(written: Path) -> None:
    index = json.loads((written / INDEX).read_text())
    second = dict(index["connections"][1])
    _edit_index(written, {"tuple": "10.0.0.1:40009->10.0.0.2:443"}, 1)
    with pytest.raises(ImageError, match="the index says") as err:
        read_dir(written)
    assert err.value.field == "connections[1].tuple"
    # a second image of the same connection would restore two sockets for one 4-tuple
    (written / "conn-dup.img").write_bytes((written / "conn-0.img").read_bytes())
    index["connections"][1] = {**index["connections"][0], "file": "conn-dup.img", "fd": 9}
    (written / INDEX).write_text(json.dumps(index))
    with pytest.raises(ImageError, match="listed twice") as err:
        read_dir(written)
    assert err.value.field == "connections[1]" and second["file"] == "conn-1.img"


def test_write_dir_refuses_one_connection_twice_and_leaves_no_partial_index(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="connections 0 and 1 are both") as err:
        write_dir(tmp_path / "twice", [(5, _state(40000)), (6, _state(40000))], {})
    assert err.value.field == "connections[1]" and not (tmp_path / "twice").exists()
    write_dir(tmp_path / "once", [(5, _state(40000))], {})
    assert sorted(p.name for p in (tmp_path / "once").iterdir()) == ["conn-0.img", INDEX]


def test_a_write_stopped_half_way_leaves_the_directory_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception (or Ctrl-C) between two images removes those written: a second dump into the directory works."""
    directory = tmp_path / "dump"
    calls = []
    real = ConnectionState.to_bytes

    def failing(self: ConnectionState) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(ConnectionState, "to_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        write_dir(directory, [(5, _state(40000)), (6, _state(40001))], {"pid": 1})
    assert list(directory.iterdir()) == []
    monkeypatch.setattr(ConnectionState, "to_bytes", real)
    write_dir(directory, [(5, _state(40000))], {"pid": 1})
    assert [state.tuple.local_port for _, state in read_dir(directory)] == [40000]


def test_images_a_killed_dump_left_without_an_index_are_named(tmp_path: Path) -> None:
    """What a SIGKILL while writing leaves (images, no index.json) is recognised and the way out said."""
    directory = tmp_path / "dump"
    directory.mkdir(mode=0o700)
    (directory / "conn-0.img").write_bytes(b"SKCN")
    with pytest.raises(ImageError, match="no index.json: a dump killed while writing them .* delete them"):
        write_dir(directory, [(5, _state(40000))], {"pid": 1})
    (directory / "other").write_text("x")
    with pytest.raises(ImageError, match="is not empty"):
        write_dir(directory, [(5, _state(40000))], {"pid": 1})


def test_appended_connections_read_back_after_the_others(written: Path) -> None:
    # `sockrepair dump --kill`'s listen backlog: the first images and their entries stay as they were
    before = {name: (written / name).read_bytes() for name in ("conn-0.img", "conn-1.img")}
    fd = os.open(written, os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries = append_dir(written, fd, [(NO_FD, _state(40002))])
    finally:
        os.close(fd)
    assert [(e.file, e.fd) for e in entries] == [("conn-2.img", NO_FD)]
    pairs = read_dir(written)
    assert [(e.file, e.fd, s) for e, s in pairs] == [("conn-0.img", 5, _state(40000)), ("conn-1.img", 6, _state(40001)),
                                                    ("conn-2.img", NO_FD, _state(40002))]
    assert all((written / name).read_bytes() == data for name, data in before.items())
    assert stat.S_IMODE((written / "conn-2.img").stat().st_mode) == 0o600


def test_an_append_that_fails_leaves_the_index_and_no_new_image(written: Path) -> None:
    (written / "index.json.part").mkdir()  # the new index cannot be written
    fd = os.open(written, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            append_dir(written, fd, [(NO_FD, _state(40002))])
    finally:
        os.close(fd)
    assert [e.file for e, _ in read_dir(written)] == ["conn-0.img", "conn-1.img"]
    assert not (written / "conn-2.img").exists()


@pytest.mark.parametrize(("ports", "field"), [([40001], "connections[2]"), ([40002, 40002], "connections[3]")])
def test_an_append_of_a_tuple_listed_already_is_refused_and_writes_nothing(written: Path, ports: list[int],
                                                                           field: str) -> None:
    # one the index lists, or one given twice: two sockets of one 4-tuple cannot be restored
    before = {p.name: p.read_bytes() for p in written.iterdir()}
    fd = os.open(written, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ImageError, match="both 10.0.0.1:4000[12]->10.0.0.2:443: one image per connection") as err:
            append_dir(written, fd, [(NO_FD, _state(port)) for port in ports])
    finally:
        os.close(fd)
    assert err.value.field == field
    assert {p.name: p.read_bytes() for p in written.iterdir()} == before


@pytest.mark.parametrize("fd", [-2, 1 << 31])
def test_an_fd_that_is_neither_a_number_nor_none_is_refused(written: Path, fd: int) -> None:
    _edit_index(written, {"fd": fd}, 1)
    with pytest.raises(ImageError, match=f"fd {fd} is not a file descriptor number"):
        read_dir(written)
