"""Moving the connections of a plain program (no sockrepair inside) to a new program, by pid."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import sockrepair
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.errors import ProcessError
from sockrepair.image.directory import read_dir
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.lab.subjects import start_echo, stop
from sockrepair.lock import Locker
from sockrepair.move import dump as dump_module
from sockrepair.move import take
from sockrepair.move.dump import After, dump, inspect
from sockrepair.move.keep import Keeper
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import stat, tcp_sockets, tcp_table
from sockrepair.move.quiesce import OnBusy, Quiescence
from sockrepair.state import ConnTuple
from tests.root.pairs import tcp_info, wait_for
from tests.root.programs import free_port
from tests.root.streams import (
    connect_clients,
    echo_clients,
    echo_round,
    pattern,
    recv_exactly,
)


def test_dump_by_pid_and_restore_into_a_new_program(netns, tmp_path):
    with echo_clients(4, 50_000) as (server, clients, offsets, stop_later):
        report = dump(server.pid, tmp_path / "img", after=After.KILL)
        assert server.wait(5) == -signal.SIGKILL
        assert len(report.connections) == 4
        assert list(report.phases_ms) == ["freeze", "lock", "checkpoint", "write", "kill", "keep"]
        assert report.kept.recording and (tmp_path / "img" / "packets.img").stat().st_mode & 0o777 == 0o600
        mode = os.stat(tmp_path / "img" / "conn-0.img").st_mode & 0o777
        assert mode == 0o600
        restored = stop_later(subprocess.Popen(
            [sys.executable, "-m", "sockrepair.cli.main", "restore", "-D", str(tmp_path / "img"), "--exec",
             sys.executable, str(ECHO_SERVER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        assert restored.stdout is not None
        assert restored.stdout.readline().startswith(b"ready")
        # the clients never saw an error: every byte echoed once and in order after the move
        echo_round(clients, offsets, 200_000)
        # and nothing is left locked
        assert sockrepair.list_locks() == []


def test_restore_lands_in_the_namespace_the_images_came_from(ns, tmp_path):
    """The program runs in a named namespace; dump and restore run from this one, and the restore names no
    namespace: the index says where the connections were, and they come back there."""
    with echo_clients(2, 10_000, ns) as (server, clients, offsets, stop_later):
        cli = [sys.executable, "-m", "sockrepair.cli.main"]
        done = subprocess.run([*cli, "dump", "--pid", str(server.pid), "-D", str(tmp_path / "img")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads((tmp_path / "img" / "index.json").read_text())["source"]["netns"] == ns.name
        restored = stop_later(subprocess.Popen([*cli, "restore", "-D", str(tmp_path / "img"), "--exec",
                                                sys.executable, str(ECHO_SERVER)], stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE))
        assert restored.stdout is not None and restored.stdout.readline().startswith(b"ready")
        echo_round(clients, offsets, 50_000)


def test_dump_leave_running_keeps_serving(netns, tmp_path):
    with echo_clients(2, 10_000) as (server, clients, offsets, _):
        report = dump(server.pid, tmp_path / "img", after=After.LEAVE_RUNNING)
        assert report.after == "leave-running"
        assert list(report.phases_ms) == ["freeze", "lock", "checkpoint", "write", "resume"]
        assert report.kept.recording and report.kept.fell_back == 0  # kept from the lock on, delivered on resume
        echo_round(clients, offsets, 10_000)
        items = read_dir(tmp_path / "img")
        assert sorted(str(e.tuple.reversed()) for e, _ in items) == sorted(
            f"127.0.0.1:{c.getsockname()[1]}->127.0.0.1:{c.getpeername()[1]}" for c in clients)
        assert sockrepair.list_locks() == []
        assert _state(server.pid) not in ("T", "t")


def test_dump_leave_running_delivers_what_came_after_the_delivery(netns, tmp_path, monkeypatch):
    """A request sent once the kept packets were delivered, while the connection is still locked, is kept too and
    delivered after the unlock: the peer does not retransmit it."""
    keepers: list[Keeper] = []

    class Watched(Keeper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            keepers.append(self)

    real_unlock = Locker.unlock
    port = free_port()
    server = start_echo(f"127.0.0.1:{port}")
    [client] = connect_clients(port, 1)

    def unlock_after_a_request(self, items, *args, **kwargs):
        client.sendall(b"late")
        wait_for(lambda: keepers[0].pending(items) == 1, "the request to reach the lock", 5.0)
        return real_unlock(self, items, *args, **kwargs)

    monkeypatch.setattr(dump_module, "Keeper", Watched)
    monkeypatch.setattr(Locker, "unlock", unlock_after_a_request)
    try:
        echo_round([client], [0], 1_000)
        report = dump(server.pid, tmp_path / "img", after=After.LEAVE_RUNNING)
        assert recv_exactly(client, 4) == b"late"
        assert tcp_info(client)[2] == 0
        assert (report.kept.delivered, report.kept.fell_back) == (1, 0)
    finally:
        client.close()
        stop(server)


def test_dump_leave_running_acknowledges_a_kept_request_while_locked(netns, tmp_path, monkeypatch):
    """A request the peer sends while the connection is locked is delivered to the resumed socket, whose ACK must
    pass the lock: the peer sees its request acknowledged before the unlock. The resumed socket was not marked, the
    lock dropped its ACK, and the request waited for the echo (after the thaw) or the peer's retransmission."""
    keepers: list[Keeper] = []

    class Watched(Keeper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            keepers.append(self)

    real_resume, real_unlock = dump_module.resume, Locker.unlock
    port = free_port()
    server = start_echo(f"127.0.0.1:{port}")
    [client] = connect_clients(port, 1)
    unacked_at_unlock: list[int] = []

    def resume_after_a_request(fd):
        if not keepers[0].pending([_tuple(client)]):
            client.sendall(b"while locked")
            wait_for(lambda: keepers[0].pending([_tuple(client)]) == 1, "the request to reach the lock", 5.0)
        return real_resume(fd)

    def unlock_once_acknowledged(self, items, *args, **kwargs):
        with contextlib.suppress(pytest.fail.Exception):
            wait_for(lambda: _unacked(client) == 0, "the peer to see its request acknowledged", 2.0)
        unacked_at_unlock.append(_unacked(client))
        return real_unlock(self, items, *args, **kwargs)

    monkeypatch.setattr(dump_module, "Keeper", Watched)
    monkeypatch.setattr(dump_module, "resume", resume_after_a_request)
    monkeypatch.setattr(Locker, "unlock", unlock_once_acknowledged)
    try:
        echo_round([client], [0], 1_000)
        report = dump(server.pid, tmp_path / "img", after=After.LEAVE_RUNNING)
        assert recv_exactly(client, 12) == b"while locked"
        assert unacked_at_unlock == [0]
        assert tcp_info(client)[2] == 0
        assert (report.kept.delivered, report.kept.fell_back) == (1, 0)
    finally:
        client.close()
        stop(server)


def _unacked(sock: socket.socket) -> int:
    """tcpi_unacked: segments sent and not acknowledged."""
    return tcpinfo.read(sock, "tcpi_unacked")[0]


def _tuple(client: socket.socket) -> ConnTuple:
    """The server side's tuple of `client`'s connection."""
    return ConnTuple(client.family, *client.getpeername()[:2], *client.getsockname()[:2])


def _state(pid: int) -> str:
    st = stat(pid)
    assert st is not None
    return st.state


def test_inspect_leaves_a_running_stream_untouched(netns):
    port = free_port()
    server = start_echo(f"127.0.0.1:{port}")
    (client,) = connect_clients(port, 1)
    echo_round([client], [0], 100)  # the program has accepted it: the connection is at one of its fds
    errors: list[str] = []
    done = threading.Event()

    def stream() -> None:
        offset = 0
        while not done.is_set():
            data = pattern(offset, 4096, salt=9)
            client.sendall(data)
            if recv_exactly(client, 4096) != data:
                errors.append(f"mismatch at {offset}")
            offset += 4096

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        for _ in range(20):
            rows = inspect(server.pid)
            established = [st for s, st, name in rows if name == "ESTABLISHED"]
            assert len(established) == 1 and established[0] is not None
            assert established[0].tuple.local_port == port
            assert _state(server.pid) not in ("T", "t")
            time.sleep(0.01)
    finally:
        done.set()
        worker.join(10)
        client.close()
        stop(server)
    assert errors == []


def test_dump_of_a_missing_pid_is_a_clear_error(netns, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessError, match=f"no such process: {proc.pid}") as caught:
        dump(proc.pid, tmp_path / "img")
    assert caught.value.pid == proc.pid
    assert not (tmp_path / "img").exists()


def test_dump_of_a_process_without_connections(netns, tmp_path):
    server = start_echo(f"127.0.0.1:{free_port()}")
    try:
        # the states the engine carries (engine/_states.py REPAIRABLE), not only "established (nor half-closed)"
        says = (r"holds no TCP connection that can be moved \(only plain TCP ones in ESTABLISHED, SYN_SENT, FIN_WAIT1, "
                r"FIN_WAIT2, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING can\)$")
        with pytest.raises(ProcessError, match=says) as caught:
            dump(server.pid, tmp_path / "img")
        assert caught.value.pid == server.pid
        assert _state(server.pid) not in ("T", "t"), "the process was left frozen"
    finally:
        stop(server)


def test_dump_of_a_listening_fd_names_its_state(netns, tmp_path):
    port = free_port()
    server = start_echo(f"127.0.0.1:{port}")
    try:
        listener_fd = next(s.fd for s in tcp_sockets(server.pid) if s.tcp_state == 10)
        with pytest.raises(sockrepair.SocketStateError, match=f"fd {listener_fd} .* is LISTEN") as caught:
            dump(server.pid, tmp_path / "img", wanted=[listener_fd])
        assert _state(server.pid) not in ("T", "t")
        err = caught.value
        assert (err.pid, err.fd, err.tcp_state) == (server.pid, listener_fd, 10)
        assert err.tuple is not None and err.tuple.local_port == port
        with pytest.raises(ProcessError, match="not a TCP socket") as missing:
            dump(server.pid, tmp_path / "img", wanted=[999])
        assert (missing.value.pid, missing.value.fd) == (server.pid, 999)
    finally:
        stop(server)


def test_a_checkpoint_error_names_the_process_fd_not_the_copy(netns, tmp_path, monkeypatch):
    """A connection disconnected (connect(AF_UNSPEC)) between the /proc read and the freeze reaches checkpoint() in
    CLOSE without a peer: the engine names the pidfd_getfd copy's fd, dump() re-raises with the process's own fd,
    its pid and the tuple.
    The other connection, already checkpointed, is resumed and keeps echoing."""
    port = free_port()
    server = start_echo(f"127.0.0.1:{port}")
    keep, gone = connect_clients(port, 2)
    try:
        offsets = [0, 0]
        echo_round([keep, gone], offsets, 1000)  # both accepted: each is at one of the program's fds
        gone_tuple = next(s.tuple for s in tcp_sockets(server.pid) if s.tuple.remote_port == gone.getsockname()[1])
        gone_fd = next(s.fd for s in tcp_sockets(server.pid) if s.tuple == gone_tuple)
        select = take.select_sockets

        def select_then_close(pid, wanted, *rest):
            chosen = select(pid, wanted, *rest)
            # stopped, the program cannot close its end: the disconnected socket stays at its fd, in CLOSE with no
            # peer (unhashed: it leaves /proc/net/tcp)
            os.kill(server.pid, signal.SIGSTOP)
            with PidFd(server.pid) as pidfd:
                copy = pidfd.getfd(gone_fd)
            try:
                unspec = ctypes.create_string_buffer(16)  # sa_family AF_UNSPEC: tcp_disconnect
                assert ctypes.CDLL(None, use_errno=True).connect(copy, unspec, 16) == 0
            finally:
                os.close(copy)
            inode = next(s.inode for s in chosen if s.fd == gone_fd)
            deadline = time.monotonic() + 5
            while inode in tcp_table(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            return chosen

        monkeypatch.setattr(take, "select_sockets", select_then_close)
        with pytest.raises(sockrepair.SocketStateError, match=f"^fd {gone_fd} of process {server.pid} ") as caught:
            # the test's SIGSTOP may catch the program between two waits, where the quiescent freeze would wait for
            # it in vain: this test is about the error's names, so the freeze takes it as it is
            dump(server.pid, tmp_path / "img", quiescence=Quiescence(on_busy=OnBusy.MOVE))
        err = caught.value
        assert (err.pid, err.fd, err.tuple, err.tcp_state) == (server.pid, gone_fd, gone_tuple, 7)
        assert "in state CLOSE without a peer" in str(err)
        assert sockrepair.list_locks() == []
        # the test's own SIGSTOP is the test's to undo: sockrepair's freeze (ptrace) leaves job control alone
        assert _state(server.pid) == "T"
        os.kill(server.pid, signal.SIGCONT)
        wait_for(lambda: _state(server.pid) not in ("T", "t"), "the process to go on")
        echo_round([keep], offsets[:1], 10_000)
    finally:
        keep.close()
        gone.close()
        stop(server)


def test_restore_where_the_address_is_missing_then_retry(tmp_path):
    """A failed restore leaves the images usable and no stale lock (the TTL ends it); a retry where the address
    exists brings the connection back."""
    from sockrepair.lock import Locker
    from sockrepair.move.land import restore_all
    from sockrepair.netns import NetNS

    with NetNS() as src, NetNS() as dst:
        dst.ip("addr", "del", "127.0.0.1/8", "dev", "lo")  # 127.0.0.1 is not a local address there
        with src.entered():
            port = free_port()
        server = start_echo(f"127.0.0.1:{port}", netns=src.name)
        try:
            with src.entered():
                (client,) = connect_clients(port, 1)
            client.sendall(b"hello")
            assert recv_exactly(client, 5) == b"hello"
            dump(server.pid, tmp_path / "img", ttl=1.0)
            states = [s for _, s in read_dir(tmp_path / "img")]
            with pytest.raises(sockrepair.AddressNotLocalError, match="127.0.0.1 is not configured"):
                restore_all(states, dst.name)
            with Locker(src.name) as locker:
                assert len(locker.list_locks()) == 1
                time.sleep(1.5)
                assert locker.list_locks() == [], "the lock outlived its TTL"
            (sock,) = restore_all(states, src.name)
            with sock:
                client.sendall(b"again")
                assert recv_exactly(sock, 5) == b"again"
                sock.sendall(b"back")
                assert recv_exactly(client, 4) == b"back"
            client.close()
        finally:
            stop(server)


def test_inspect_sends_nothing_on_the_wire(netns):
    """inspect leaves repair mode without a window probe: an idle connection stays silent on the wire. The same
    freeze ended WITH a probe is seen, which shows the check can fail."""
    from sockrepair.engine._repair import repair_off
    from sockrepair.lab.recorder import Recorder

    port = free_port()
    server = start_echo(f"127.0.0.1:{port}")
    (client,) = connect_clients(port, 1)
    try:
        client.sendall(b"warm")
        assert recv_exactly(client, 4) == b"warm"
        time.sleep(0.3)  # let delayed ACKs go out first
        conn = sockrepair.ConnTuple(socket.AF_INET, "127.0.0.1", client.getsockname()[1], "127.0.0.1", port)
        with Recorder("lo") as quiet:
            for _ in range(5):
                inspect(server.pid)
            time.sleep(0.05)
        assert quiet.report(conn).segments == 0
        with Recorder("lo") as noisy:
            state = sockrepair.checkpoint(client)
            repair_off(client.fileno(), probe=True)
            time.sleep(0.05)
        assert state.tuple == conn
        assert noisy.report(conn).segments >= 1
    finally:
        client.close()
        stop(server)


def test_a_socket_that_changed_while_frozen_is_not_ended(netns, tmp_path, monkeypatch):
    """Without the lock, bytes the peer sends after the checkpoint land in the frozen socket: end_source refuses
    before discarding anything, names the process's fd, and the process goes on with every connection."""
    from sockrepair.move import dump as dump_module

    with echo_clients(2, 1000) as (server, clients, offsets, _):
        late = clients[1]
        late_fd = next(s.fd for s in tcp_sockets(server.pid) if s.tuple.remote_port == late.getsockname()[1])
        write = dump_module.write_images

        def write_then_send(*args, **kwargs):
            entries = write(*args, **kwargs)
            late.sendall(pattern(offsets[1], 100, salt=1))
            time.sleep(0.05)
            return entries

        monkeypatch.setattr(dump_module, "write_images", write_then_send)
        with pytest.raises(sockrepair.SocketStateError, match="changed since its checkpoint") as caught:
            dump(server.pid, tmp_path / "img", lock=False)
        err = caught.value
        assert (err.pid, err.fd, err.tcp_state) == (server.pid, late_fd, 1)
        assert str(err).startswith(f"fd {late_fd} of process {server.pid} (TCP {err.tuple}) changed")
        assert _state(server.pid) not in ("T", "t")
        assert recv_exactly(late, 100) == pattern(offsets[1], 100, salt=1)
        offsets[1] += 100
        echo_round(clients, offsets, 10_000)
