"""Every input is untrusted: index.json, sockrepair-criu.json and criu's images, damaged in thousands of ways, give an
ImageError (one line from the CLI, exit 1) and nothing else; an empty network namespace name is a usage error; a
socket that was never checkpointed is not discarded."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sockrepair import discard
from sockrepair.criu import images
from sockrepair.criu.manifest import (
    MANIFEST,
    LockedConnection,
    Manifest,
    TreeRecord,
    load,
)
from sockrepair.errors import ImageError, NetnsError, SocketStateError
from sockrepair.image.directory import (
    INDEX,
    MAX_INDEX_BYTES,
    NO_FD,
    read_dir,
    write_dir,
)
from sockrepair.lock.owner import default_owner, owner_label
from sockrepair.move.land import restore_all
from sockrepair.netns import named
from sockrepair.state import ConnectionState, ConnTuple, TcpOptions
from tests.clihelp import run_main

DUMP = Path(__file__).resolve().parent.parent / "data" / "criu" / "dump-2pairs"
STATE = ConnectionState(
    tuple=ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 443), tcp_state=1, send_seq=7, recv_seq=9,
    send_queue=b"payload", unsent_len=0, recv_queue=b"", options=TcpOptions(1460, True, True, True, 7, 7),
    window=None, timestamp=5,
)  # fmt: skip
# Values a damaged or hostile file may hold where something else is expected.
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 5, 2**31, 2**70, 1.5, float("inf"), "", "x", "../../etc/passwd", "/etc/passwd",
    ".hidden", "a\x00b", [], [1], ["x"], {}, {"a": 1}, [[[[[[[[]]]]]]]], "127.0.0.1:0->127.0.0.1:1",
    "1.2.3.4:1->[::1]:2", "f" * 64, "F" * 64, "two\nlines", {"two\nlines": 1},
]  # fmt: skip


def _paths(value: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a parsed JSON value, as the keys and indexes leading to it."""
    yield here
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*here, key))


def _mutants(doc: Any, count: int, seed: int) -> Iterator[Any]:
    rng = random.Random(seed)
    places = list(_paths(doc))
    for _ in range(count):
        mutant = copy.deepcopy(doc)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(places)
            if not path:
                yield rng.choice(ODD_VALUES)
                break
            parent = mutant
            try:
                for key in path[:-1]:
                    parent = parent[key]
                if rng.random() < 0.2 and isinstance(parent, dict):
                    parent.pop(path[-1], None)
                else:
                    parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
            except (KeyError, IndexError, TypeError):
                continue
        else:
            yield mutant


WHOLE_DOCUMENTS = [b"[]", b"5", b'"x"', b"null", b"{}", b"[" * 100_000 + b"]" * 100_000, b"[" * 3_000_000,
                   b'{"version": 1, "connections": ' + b"[" * 50 + b"]" * 50 + b"}", b"\xff\xfe", b"",
                   b'{"version": true, "connections": []}', b'{"version": 1, "connections": [5]}']


@pytest.fixture
def dump_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "dump"
    other = dataclasses.replace(STATE, tuple=dataclasses.replace(STATE.tuple, local_port=STATE.tuple.local_port + 1))
    write_dir(directory, [(3, STATE), (4, other)], {"pid": 1, "command": "x"})
    return directory


def _one_line_error(*argv: str) -> str:
    code, out, err = run_main(*argv)
    assert code == 1 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("sockrepair: error: "), err
    return err


@pytest.mark.parametrize("data", WHOLE_DOCUMENTS, ids=range(len(WHOLE_DOCUMENTS)))
def test_an_index_that_is_not_one_is_one_line(dump_dir: Path, data: bytes) -> None:
    (dump_dir / INDEX).write_bytes(data)
    with pytest.raises(ImageError) as err:
        read_dir(dump_dir)
    assert err.value.path == str(dump_dir / INDEX)
    assert str(dump_dir / INDEX) in _one_line_error("restore", "-D", str(dump_dir), "--unix", str(dump_dir / "s"))


def test_an_index_larger_than_the_bound_is_not_read(dump_dir: Path) -> None:
    (dump_dir / INDEX).write_bytes(b" " * (MAX_INDEX_BYTES + 1))
    with pytest.raises(ImageError, match=f"larger than {MAX_INDEX_BYTES} bytes"):
        read_dir(dump_dir)


def test_index_fuzz_gives_image_errors_only(dump_dir: Path) -> None:
    index = json.loads((dump_dir / INDEX).read_text())
    accepted = 0
    for mutant in _mutants(index, 1500, seed=11):
        try:
            data = json.dumps(mutant).encode()
        except ValueError:
            continue
        (dump_dir / INDEX).write_bytes(data)
        try:
            pairs = read_dir(dump_dir)
        except ImageError as exc:
            assert "\n" not in str(exc)
            continue
        accepted += 1
        assert all(isinstance(s, ConnectionState) and isinstance(e.fd, int) and (e.fd >= 0 or e.fd == NO_FD)
                   for e, s in pairs)
    assert 0 < accepted < 1500  # harmless edits (created, source) still read


def _manifest() -> Manifest:
    return Manifest("4.2.1", "skip", 600.0, 4026531840,
                    [TreeRecord(100, "tree-100", [100, 101], [5, 6], "server", False, dumped=True)],
                    [LockedConnection("127.0.0.1:7022->127.0.0.1:40000", [100], "tree")])


def test_manifest_fuzz_gives_image_errors_only(tmp_path: Path) -> None:
    _manifest().save(tmp_path)
    raw = json.loads((tmp_path / MANIFEST).read_text())
    accepted = 0
    for mutant in _mutants(raw, 1500, seed=12):
        try:
            data = json.dumps(mutant).encode()
        except ValueError:
            continue
        (tmp_path / MANIFEST).write_bytes(data)
        try:
            manifest = load(tmp_path)
        except ImageError as exc:
            assert "\n" not in str(exc)
            continue
        accepted += 1
        for tree in manifest.trees:
            assert "/" not in tree.dir and all(isinstance(p, int) and p > 0 for p in tree.pids)
        for conn in manifest.connections:
            ConnTuple.parse(conn.tuple)
    assert accepted < 1500
    for data in WHOLE_DOCUMENTS:
        (tmp_path / MANIFEST).write_bytes(data)
        with pytest.raises(ImageError):
            load(tmp_path)
        _one_line_error("criu", "show", str(tmp_path))


@pytest.fixture
def criu_copy(tmp_path: Path) -> Path:
    copy_dir = tmp_path / "criu"
    shutil.copytree(DUMP, copy_dir)
    os.chmod(copy_dir, 0o700)
    return copy_dir


def _damaged(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:
        del buf[rng.randrange(len(buf)) :]
    elif kind == 2:
        at = rng.randrange(len(buf))
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    else:
        at = rng.randrange(8, max(9, len(buf) - 4))
        buf[at : at + 4] = struct.pack("<I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, len(buf)]))
    return bytes(buf)


def test_criu_image_fuzz_gives_image_errors_only(criu_copy: Path) -> None:
    rng = random.Random(13)
    names = sorted(p.name for p in criu_copy.glob("tcp-stream-*.img")) + ["files.img"]
    originals = {name: (criu_copy / name).read_bytes() for name in names}
    failed = 0
    for _ in range(600):
        name = rng.choice(names)
        (criu_copy / name).write_bytes(_damaged(originals[name], rng))
        try:
            states = images.load_connections(criu_copy)
        except ImageError as exc:
            assert "\n" not in str(exc)
            failed += 1
        else:
            assert all(isinstance(s, ConnectionState) for s in states)
        (criu_copy / name).write_bytes(originals[name])
    assert failed > 300
    (criu_copy / "files.img").write_bytes(b"\x19CVT")
    _one_line_error("restore", "--from-criu", str(criu_copy), "--unix", str(criu_copy / "s"))


def _stream(**fields: int) -> bytes:
    entry = images.TcpStreamEntry(**fields).SerializeToString()
    return struct.pack("<III", images.MAGIC_COMMON, images.MAGIC_TCP_STREAM, len(entry)) + entry


def _files(**isk: Any) -> bytes:
    fields = {"id": 1, "ino": 0x10, "family": socket.AF_INET, "proto": 6, "state": 1, "src_port": 5, "dst_port": 6,
              "src_addr": [0x0100007F], "dst_addr": [0x0100007F], **isk}
    entry = images.FileEntry(type=images.FD_TYPE_INETSK, id=1, isk=images.InetSkEntry(**fields)).SerializeToString()
    return struct.pack("<III", images.MAGIC_COMMON, images.MAGIC_FILES, len(entry)) + entry


@pytest.mark.parametrize(
    ("isk", "stream", "message"),
    [
        ({"src_port": 0}, {}, "local_port: 0 is not in 1..65535"),
        ({"dst_port": 70000}, {}, "remote_port: 70000 is not in 1..65535"),
        ({"state": 10}, {}, "tcp_state: 10 is not a TCP state"),
        ({"state": 99}, {}, "tcp_state: 99"),
        ({"src_addr": []}, {}, "source address has 0 u32 word"),
        ({"family": socket.AF_INET6}, {}, "source address has 1 u32 word"),
        ({"family": 99}, {}, "address family 99"),
        ({}, {"mss_clamp": 70000}, "options.mss: 70000"),
        ({}, {"snd_wscale": 15}, "options.snd_wscale: 15"),
        ({}, {"rcv_wscale": 200}, "options.rcv_wscale: 200"),
    ],
)
def test_criu_connections_follow_the_rules_of_our_images(criu_copy: Path, isk: dict[str, Any],
                                                         stream: dict[str, int], message: str) -> None:
    for old in criu_copy.glob("tcp-stream-*.img"):
        old.unlink()
    (criu_copy / "files.img").write_bytes(_files(**isk))
    (criu_copy / "tcp-stream-10.img").write_bytes(_stream(**{"inq_seq": 1, "outq_seq": 2, "mss_clamp": 1460, **stream}))
    with pytest.raises(ImageError, match=message):
        images.load_connections(criu_copy)
    assert _one_line_error("criu", "show", str(criu_copy))


def test_a_criu_mark_is_the_c_int_setsockopt_takes(criu_copy: Path) -> None:
    for old in criu_copy.glob("tcp-stream-*.img"):
        old.unlink()
    opts = images.InetSkEntry(opts={"so_mark": 0xFFFFFFFF}).opts
    (criu_copy / "files.img").write_bytes(_files(opts=opts))
    (criu_copy / "tcp-stream-10.img").write_bytes(_stream(inq_seq=1, outq_seq=2, mss_clamp=1460))
    (state,) = images.load_connections(criu_copy)
    assert state.sockopts.mark == -1


@pytest.mark.parametrize(
    "argv",
    [
        ("restore", "-D", "d", "--netns", "", "--unix", "x"),
        ("restore", "-D", "d", "--netns", "../x", "--unix", "x"),
        ("criu", "restore", "-D", "d", "--netns", ""),
        ("lock", "1.2.3.4:1->1.2.3.5:2", "--netns", ""),
        ("locks", "--netns", ""),
        ("unlock", "--all", "--netns", ""),
    ],
)
def test_an_empty_netns_name_is_a_usage_error(argv: tuple[str, ...]) -> None:
    code, out, err = run_main(*argv)
    assert code == 2 and "not a network namespace name" in err


@pytest.mark.parametrize("name", ["", "a/b", ".."])
def test_the_library_refuses_an_empty_netns_name(name: str) -> None:
    with pytest.raises(NetnsError, match="not a network namespace name"):
        named(name)
    with pytest.raises(NetnsError):
        restore_all([STATE], name)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("unlock", "--owner", "x"), "exactly one"),
        (("unlock", "--all", "--everything"), "exactly one"),
        (("unlock", "--everything", "1.2.3.4:1->1.2.3.5:2"), "exactly one"),
        (("unlock", "1.2.3.4:1->1.2.3.5:2", "--owner", "x"), "--owner goes with --all"),
        (("unlock", "--everything", "--owner", "x"), "--owner goes with --all"),
    ],
)
def test_unlock_scopes_are_exclusive(argv: tuple[str, ...], message: str) -> None:
    assert message in _one_line_error(*argv)


@pytest.mark.parametrize(
    ("owner", "label"),
    [("sockrepair pid=3 host=h", "sockrepair"), ("my app pid=3 host=h", "my app"), ("", ""), ("nft rule", "nft rule")],
)
def test_owner_label(owner: str, label: str) -> None:
    assert owner_label(owner) == label
    assert owner_label(default_owner(label or None)) == (label or "sockrepair")


def test_discarding_a_socket_never_checkpointed_is_refused() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        with pytest.raises(SocketStateError, match="not in repair mode") as err:
            discard(server, STATE)
        assert err.value.fd == server.fileno() and err.value.tuple == STATE.tuple
        with pytest.raises(SocketStateError, match="not in repair mode"):
            discard(server.fileno())
        # still open, and the peer saw no FIN: the connection goes on
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(1)
        server.sendall(b"still here")
        client.setblocking(True)
        assert client.recv(10) == b"still here"
