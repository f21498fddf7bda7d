"""Other users on the machine: their directories are not trusted with images, their listeners do not get live
connections unless named, and one owner's `unlock --all` leaves another owner's locks alone."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockrepair.cli.lock import add_lock_commands
from sockrepair.errors import HandoffError, ImageError
from sockrepair.image.directory import read_dir, write_dir
from sockrepair.lock import Locker
from sockrepair.move.handoff import connect_receiver, send_over_unix
from sockrepair.netns import NetNS
from sockrepair.state import ConnectionState, ConnTuple, TcpOptions
from tests.clihelp import run_group, run_main

NOBODY = 65534
STATE = ConnectionState(
    tuple=ConnTuple(socket.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 443), tcp_state=1, send_seq=7, recv_seq=9,
    send_queue=b"payload", unsent_len=0, recv_queue=b"", options=TcpOptions(1460, True, True, True, 7, 7),
    window=None, timestamp=5,
)  # fmt: skip
# Binds as root (only root may create the socket in the test's 0700 directory), then listens as `uid`: SO_PEERCRED
# gives the credentials of the listen() call. Prints the fd count of each connection it accepts.
LISTENER = """
import os, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.setgid(uid); os.setuid(uid)
s.listen(4)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 253)
    except OSError:
        fds = []
    print(f"got {len(fds)}", flush=True)
    for fd in fds:
        os.close(fd)
    conn.close()
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@pytest.fixture
def listener_as(tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def start(uid: int, name: str = "take.sock") -> Path:
        path = tmp_path / name
        proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(path), str(uid)], stdout=subprocess.PIPE,
                                text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        return path

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_listener_of_another_user_gets_no_connection(listener_as: object, tmp_path: Path) -> None:
    path = listener_as(NOBODY)  # type: ignore[operator]
    with socket.socket() as s:
        with pytest.raises(HandoffError, match=f"runs as uid {NOBODY}, not as one of 0"):
            send_over_unix(str(path), [s], [STATE.tuple])
        # named by the user, it is accepted
        send_over_unix(str(path), [s], [STATE.tuple], uids=[NOBODY])


def test_restore_refuses_the_receiver_before_restoring_anything(listener_as: object, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = listener_as(NOBODY)  # type: ignore[operator]
    write_dir(tmp_path / "img", [(3, STATE)], {})
    restored: list[object] = []
    monkeypatch.setattr("sockrepair.cli.move.restore_all", lambda *a, **kw: restored.append(a) or [])
    monkeypatch.setattr("sockrepair.cli.move.unlock_in", lambda *a: None)
    code, out, err = run_main("restore", "-D", str(tmp_path / "img"), "--unix", str(path))
    assert code == 1 and err.count("\n") == 1
    assert "its listener (pid " in err and f"runs as uid {NOBODY}" in err and "--unix-uid" in err
    assert restored == []
    code, out, err = run_main("restore", "-D", str(tmp_path / "img"), "--unix", str(path), "--unix-uid", "nobody")
    assert code == 0 and len(restored) == 1


def test_a_receiver_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(shared / "take.sock"))
        server.listen(1)
        with pytest.raises(HandoffError, match="its directory .*: writable by group and others"):
            connect_receiver(str(shared / "take.sock"))
        os.chmod(shared, 0o700)
        os.symlink(shared / "take.sock", shared / "link.sock")
        with pytest.raises(HandoffError, match="it is a symlink"):
            connect_receiver(str(shared / "link.sock"))
        connect_receiver(str(shared / "take.sock")).close()


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    write_dir(theirs, [(3, STATE)], {})
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ImageError, match=f"owned by uid {NOBODY}, not by you") as err:
        read_dir(theirs)
    assert err.value.path == str(theirs)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    os.chown(empty, NOBODY, NOBODY)
    with pytest.raises(ImageError, match=f"owned by uid {NOBODY}"):
        write_dir(empty, [(3, STATE)], {})
    assert list(empty.iterdir()) == []
    code, _, err = run_main("restore", "-D", str(theirs), "--unix", str(tmp_path / "x.sock"))
    assert code == 1 and f"owned by uid {NOBODY}" in err and err.count("\n") == 1


def _as_nobody(directory: Path) -> int:
    """read_dir(directory) in a child that runs as nobody: its exit status is the number of connections read, or
    100 + 1 for an ImageError."""
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = len(read_dir(directory))
        except ImageError:
            code = 101
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_root_owned_directories_are_readable_by_another_user() -> None:
    """A user may read images root wrote (root is trusted), never another user's."""
    top = Path(tempfile.mkdtemp(prefix="sockrepair-users-"))
    try:
        os.chmod(top, 0o755)
        other = dataclasses.replace(STATE, tuple=dataclasses.replace(STATE.tuple, local_port=STATE.tuple.local_port + 1))
        write_dir(top / "img", [(3, STATE), (4, other)], {})
        os.chmod(top / "img", 0o755)
        for name in ("conn-0.img", "conn-1.img", "index.json"):
            os.chmod(top / "img" / name, 0o644)
        assert _as_nobody(top / "img") == 2
        os.chown(top / "img", 1, 1)  # daemon: neither root nor the reader
        assert _as_nobody(top / "img") == 101
    finally:
        shutil.rmtree(top)


T1 = ConnTuple(socket.AF_INET, "10.0.0.1", 1000, "10.0.0.2", 2000)
T2 = ConnTuple(socket.AF_INET, "10.0.0.1", 1001, "10.0.0.2", 2000)
T3 = ConnTuple(socket.AF_INET, "10.0.0.1", 1002, "10.0.0.2", 2000)


def test_unlock_all_releases_one_owner_only() -> None:
    with NetNS() as ns:
        try:
            with Locker(ns.name, "alice") as alice, Locker(ns.name, "sockrepair-criu") as criu, \
                    Locker(ns.name) as plain:
                alice.lock([T1], 30)
                criu.lock([T2], 30)
                plain.lock([T3], 30)
                removed = alice.unlock_owned("alice")
                assert [(r.tuple, r.owner.split()[0]) for r in removed] == [(T1, "alice")]
                assert [r.tuple for r in plain.list_locks()] == [T2, T3]
                code, out = run_group(add_lock_commands, "unlock", "--all", "--netns", ns.name)
                assert code == 0 and f"  {T3}  owner sockrepair pid=" in out
                assert out.startswith("unlocked 1 connection(s) of owner 'sockrepair'; 1 lock(s) of other owners kept")
                assert [(r.tuple, r.owner.split()[0]) for r in plain.list_locks()] == [(T2, "sockrepair-criu")]
                code, out = run_group(add_lock_commands, "unlock", "--everything", "--netns", ns.name)
                assert code == 0 and f"  {T2}  owner sockrepair-criu pid=" in out
                assert plain.list_locks() == [] and plain.rule_count() == 0
        finally:
            with Locker(ns.name) as cleanup:
                cleanup.unlock_all()
