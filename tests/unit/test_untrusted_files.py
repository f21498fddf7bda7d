"""Files and directories others could have planted or can write: a symlink is never followed, a group- or
other-writable directory never trusted, a non-regular file never read, and nothing of an earlier dump mixed in."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from sockrepair.criu import driver
from sockrepair.criu.manifest import MANIFEST, Manifest, load
from sockrepair.errors import CriuError, ImageError, WireError
from sockrepair.image.directory import INDEX, read_dir, read_image, write_dir
from sockrepair.lab.pcap import write_pcap
from sockrepair.private import (
    create_private,
    make_dir,
    open_dir,
    open_private,
    read_regular,
)
from sockrepair.state import ConnectionState, ConnTuple, TcpOptions
from tests.clihelp import run_main

STATE = ConnectionState(
    tuple=ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 443), tcp_state=1, send_seq=7, recv_seq=9,
    send_queue=b"payload", unsent_len=0, recv_queue=b"", options=TcpOptions(1460, True, True, True, 7, 7),
    window=None, timestamp=5,
)  # fmt: skip


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file a symlink planted by someone else would point at."""
    path = tmp_path / "victim"
    path.write_bytes(b"precious")
    return path


def test_a_dump_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ImageError, match="is a symlink") as err:
        write_dir(tmp_path / "link", [(3, STATE)], {})
    assert err.value.path == str(tmp_path / "link")
    assert list(real.iterdir()) == []
    with pytest.raises(ImageError, match="is a symlink"):
        read_dir(tmp_path / "link")


def test_a_planted_index_symlink_is_never_followed(tmp_path: Path, victim: Path) -> None:
    directory = tmp_path / "dump"
    directory.mkdir(mode=0o700)
    (directory / INDEX).symlink_to(victim)
    with pytest.raises(ImageError, match="is not empty"):
        write_dir(directory, [(3, STATE)], {})
    assert victim.read_bytes() == b"precious"
    # and even in a directory that passed the checks, a file is created O_EXCL|O_NOFOLLOW
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            create_private(fd, INDEX)
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"precious"


def test_old_images_never_mix_with_a_new_dump(tmp_path: Path) -> None:
    directory = tmp_path / "dump"
    other = dataclasses.replace(STATE, tuple=dataclasses.replace(STATE.tuple, local_port=STATE.tuple.local_port + 1))
    write_dir(directory, [(3, STATE), (4, other)], {})
    with pytest.raises(ImageError, match="holds the images of an earlier dump: `sockrepair restore -D"):
        write_dir(directory, [(3, STATE)], {})
    assert len(read_dir(directory)) == 2
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    write_dir(empty, [(3, STATE)], {})  # an empty directory of the caller's is fine
    assert [s for _, s in read_dir(empty)] == [STATE]


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "dump"
    write_dir(directory, [(3, STATE)], {})
    os.chmod(directory, mode)
    with pytest.raises(ImageError, match="writable by (group|others)"):
        read_dir(directory)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.chmod(fresh, mode)
    with pytest.raises(ImageError, match="writable by"):
        write_dir(fresh, [(3, STATE)], {})
    assert list(fresh.iterdir()) == []


def test_a_swapped_image_symlink_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dump"
    write_dir(directory, [(3, STATE)], {})
    elsewhere = tmp_path / "elsewhere.img"
    os.rename(directory / "conn-0.img", elsewhere)
    (directory / "conn-0.img").symlink_to(elsewhere)
    with pytest.raises(ImageError, match="is a symlink") as err:
        read_dir(directory)
    assert err.value.path == str(directory / "conn-0.img")


def test_an_index_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    directory = tmp_path / "dump"
    write_dir(directory, [(3, STATE)], {})
    os.unlink(directory / INDEX)
    os.mkfifo(directory / INDEX, 0o600)
    done: list[BaseException] = []
    reader = threading.Thread(target=lambda: done.append(pytest.raises(ImageError, read_dir, directory).value))
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert "is not a regular file" in str(done[0])


@pytest.mark.parametrize("what", ["/dev/zero", "/dev/null", "directory", "fifo", "symlink"])
def test_show_refuses_what_is_not_a_regular_file(tmp_path: Path, what: str) -> None:
    path = {"directory": tmp_path, "fifo": tmp_path / "fifo", "symlink": tmp_path / "link"}.get(what, Path(what))
    if what == "fifo":
        os.mkfifo(path)
    if what == "symlink":
        (tmp_path / "real.img").write_bytes(STATE.to_bytes())
        path.symlink_to(tmp_path / "real.img")
    with pytest.raises(ImageError, match="is (not a regular file|a symlink)"):
        read_image(path)
    code, out, err = run_main("show", str(path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sockrepair: error: cannot read image")


def test_an_image_is_read_as_its_header_declares(tmp_path: Path) -> None:
    path = tmp_path / "c.img"
    data = STATE.to_bytes()
    path.write_bytes(data + b"junk")
    with pytest.raises(ImageError, match="4 bytes of trailing junk") as err:
        read_image(path)
    assert err.value.offset == len(data)
    path.write_bytes(data[:-1])
    with pytest.raises(ImageError, match="truncated") as err:
        read_image(path)
    assert err.value.offset == len(data) - 1
    path.write_bytes(data)
    assert read_image(path) == STATE


def test_read_regular_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(OSError, match="larger than 100 bytes") as err:
        read_regular(tmp_path / "big", 100)
    assert err.value.errno == errno.EFBIG
    assert read_regular(tmp_path / "big", 101) == b"x" * 101


def test_make_dir_and_open_dir(tmp_path: Path) -> None:
    fd = make_dir(tmp_path / "a" / "b")
    os.close(fd)
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    (tmp_path / "a" / "b" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        make_dir(tmp_path / "a" / "b")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        open_dir(tmp_path / "file")


def test_a_pcap_never_follows_a_symlink(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "out.pcap").symlink_to(victim)
    with pytest.raises(WireError, match="is a symlink"):
        write_pcap(tmp_path / "out.pcap", [])
    os.link(victim, tmp_path / "hard.pcap")
    with pytest.raises(PermissionError, match="single link"):
        open_private(tmp_path / "hard.pcap")
    assert victim.read_bytes() == b"precious"
    write_pcap(tmp_path / "fresh.pcap", [])
    assert stat.S_IMODE((tmp_path / "fresh.pcap").stat().st_mode) == 0o600


def test_criu_manifest_is_saved_without_following_a_planted_temporary(tmp_path: Path, victim: Path) -> None:
    made = Manifest("4.2.1", "skip", 600.0, 1, [], [])
    (tmp_path / (MANIFEST + ".tmp")).symlink_to(victim)
    made.save(tmp_path)
    assert victim.read_bytes() == b"precious"
    assert load(tmp_path) == made
    os.chmod(tmp_path, 0o777)
    with pytest.raises(ImageError, match="writable by group and others"):
        load(tmp_path)
    with pytest.raises(PermissionError):
        made.save(tmp_path)
    os.chmod(tmp_path, 0o700)


def test_criu_images_are_made_private_without_following_symlinks(tmp_path: Path, victim: Path) -> None:
    images = tmp_path / "tree-1"
    images.mkdir(mode=0o700)
    (images / "files.img").write_bytes(b"x")
    os.chmod(images / "files.img", 0o644)
    os.chmod(victim, 0o644)
    (images / "planted.img").symlink_to(victim)
    driver._private(images)
    assert stat.S_IMODE((images / "files.img").stat().st_mode) == 0o600
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


# above the largest pid_max (2**22): neither this process nor an ancestor, which criu dump refuses first
NOT_AN_ANCESTOR = 2**22 + 1


def test_criu_dump_refuses_an_unsafe_directory_before_anything_runs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "_working", lambda criu: criu)
    monkeypatch.setattr(driver, "map_trees", lambda pids: type("T", (), {"external": lambda self: [], "trees": []})())
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(CriuError, match="is a symlink"):
        driver.dump([NOT_AN_ANCESTOR], tmp_path / "link", criu=None)
    (tmp_path / "full").mkdir(mode=0o700)
    (tmp_path / "full" / "old").mkdir()
    with pytest.raises(CriuError, match="not empty"):
        driver.dump([NOT_AN_ANCESTOR], tmp_path / "full", criu=None)


@pytest.mark.parametrize("command", [["verify", "{}", "--tuple", "1.2.3.4:5->1.2.3.4:6"], ["criu", "explain", "{}"]])
def test_verify_and_explain_refuse_a_fifo_instead_of_blocking(tmp_path: Path, command: list[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, out, err = run_main(*[part.format(fifo) for part in command])
    assert code == 1 and "not a regular file" in err and err.count("\n") == 1
