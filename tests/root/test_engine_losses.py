"""A dump that would end a process holding connections it cannot move refuses before freezing anything, naming
each one (pid, fd, protocol, tuple, state); with allow_loss it dumps the rest and lists what the kill destroyed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import sockrepair
from sockrepair.engine._repair import in_repair, repair_off, repair_on
from sockrepair.image.directory import read_dir
from sockrepair.move.dump import After, dump, inspect
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import ProcSocket, stat, tcp_sockets
from sockrepair.move.quiesce import OnBusy, Quiescence
from sockrepair.move.take import socket_protocol
from tests.clihelp import run_main
from tests.root.streams import recv_exactly

# Accepts `n` connections, reads nothing, and sleeps: what it holds stays as the peers left it.
# With "mptcp", it also holds an MPTCP connection (to its own MPTCP listener, not accepted), which TCP_REPAIR cannot
# take.
HOLDER = r"""
import socket, sys, time
n = int(sys.argv[1]); proto = int(sys.argv[2])
lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
lst.bind(("127.0.0.1", 0)); lst.listen()
if sys.argv[3] == "mptcp":
    mlst = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262); mlst.bind(("127.0.0.1", 0)); mlst.listen()
    mptcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262); mptcp.connect(mlst.getsockname())
print(lst.getsockname()[1], flush=True)
held = [lst.accept()[0] for _ in range(n)]
print("accepted", flush=True)
time.sleep(600)
"""


def _holder(n: int, proto: int = 0, mptcp: bool = False) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(n), str(proto), "mptcp" if mptcp else "-"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


@pytest.fixture
def holder(netns) -> Iterator[tuple[subprocess.Popen[str], int, socket.socket, socket.socket]]:
    """A process with one ESTABLISHED connection, one CLOSE_WAIT one (5 unread bytes and the peer's FIN), and an
    MPTCP one, which the engine does not repair."""
    proc, port = _holder(2, mptcp=True)
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    closing = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "accepted"
        closing.sendall(b"hello")
        closing.shutdown(socket.SHUT_WR)
        _wait_state(proc.pid, 8)
        yield proc, port, live, closing
    finally:
        live.close()
        closing.close()
        proc.kill()
        proc.wait()


def _mptcp(pid: int) -> ProcSocket:
    (found,) = [s for s in tcp_sockets(pid) if socket_protocol(pid, s.fd) == "MPTCP" and s.tcp_state == 1]
    return found


def _wait_state(pid: int, tcp_state: int) -> None:
    for _ in range(500):
        if any(s.tcp_state == tcp_state for s in tcp_sockets(pid)):
            return
        time.sleep(0.01)
    pytest.fail(f"no socket of {pid} reached state {tcp_state}")


def _wait_stopped(pid: int) -> None:
    for _ in range(500):
        st = stat(pid)
        if st is not None and st.state == "T":
            return
        time.sleep(0.01)
    pytest.fail(f"process {pid} did not stop")


def test_dump_refuses_before_freezing_and_names_the_connection(holder, tmp_path):
    proc, _, live, closing = holder
    mp = _mptcp(proc.pid)
    with pytest.raises(sockrepair.SocketStateError) as caught:
        dump(proc.pid, tmp_path / "img")
    err = caught.value
    assert (err.pid, err.fd, err.tuple, err.tcp_state) == (proc.pid, mp.fd, mp.tuple, 1)
    assert f"fd {mp.fd} MPTCP {mp.tuple} ESTABLISHED (MPTCP is not plain TCP" in str(err)
    assert "Nothing was frozen" in str(err)
    assert not (tmp_path / "img").exists()
    assert sockrepair.list_locks() == []
    st = stat(proc.pid)
    assert st is not None and st.state not in ("T", "t")
    # both peers untouched: no reset, nothing sent
    for peer in (live, closing):
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recv(1)
    # the CLI says the same in one line and exits 1
    code, out, err_text = run_main("dump", "--pid", str(proc.pid), "-D", str(tmp_path / "img2"))
    assert (code, out) == (1, "")
    assert err_text.startswith("sockrepair: error: process ") and f"fd {mp.fd} MPTCP" in err_text
    assert err_text.count("\n") == 1


def test_allow_loss_moves_the_rest_close_wait_included_and_lists_what_was_lost(holder, tmp_path):
    """The issue's case: an ESTABLISHED and a CLOSE_WAIT connection (5 unread bytes and a FIN) both move; what
    cannot (MPTCP) is named in the report."""
    proc, _, live, closing = holder
    mp = _mptcp(proc.pid)
    code, out, err_text = run_main("dump", "--pid", str(proc.pid), "-D", str(tmp_path / "img"), "--allow-loss",
                                   "--json")
    assert code == 0, err_text
    report = json.loads(out)
    assert len(report["connections"]) == 2
    assert report["lost"] == [{"fd": mp.fd, "protocol": "MPTCP", "tuple": str(mp.tuple), "state": "ESTABLISHED",
                               "reason": "MPTCP is not plain TCP: TCP_REPAIR cannot take it"}]
    assert proc.wait(5) < 0
    images = [s for _, s in read_dir(tmp_path / "img")]
    assert sorted(s.tcp_state for s in images) == [1, 8]
    mine = {1: next(s for s in images if s.tuple.remote_port == live.getsockname()[1]),
            8: next(s for s in images if s.tcp_state == 8)}
    restored = {n: sockrepair.restore(s) for n, s in mine.items()}
    try:
        sockrepair.unlock([s.tuple for s in images])
        live.settimeout(10)
        live.sendall(b"ping")
        assert recv_exactly(restored[1], 4) == b"ping"
        # the CLOSE_WAIT one: the unread bytes, then the FIN; its peer was never reset and still reads
        cw = restored[8]
        cw.settimeout(10)
        assert cw.recv(100) == b"hello" and cw.recv(100) == b""
        cw.sendall(b"bye")
        closing.settimeout(10)
        assert recv_exactly(closing, 3) == b"bye"
        cw.close()
        assert closing.recv(10) == b""
    finally:
        for sock in restored.values():
            sock.close()


def test_leave_running_loses_nothing_and_lists_nothing(holder, tmp_path):
    proc, *_ = holder
    report = dump(proc.pid, tmp_path / "img", after=After.LEAVE_RUNNING)
    assert len(report.connections) == 2 and report.lost == []


def test_an_mptcp_socket_is_named_as_such_with_the_process_fd(netns, tmp_path):
    proc, port = _holder(1, proto=262)  # IPPROTO_MPTCP
    peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    try:
        peer.connect(("127.0.0.1", port))
        assert proc.stdout is not None and proc.stdout.readline().strip() == "accepted"
        (mp,) = [s for s in tcp_sockets(proc.pid) if s.tcp_state == 1]
        assert socket_protocol(proc.pid, mp.fd) == "MPTCP"
        with pytest.raises(sockrepair.SocketStateError) as caught:
            dump(proc.pid, tmp_path / "img", wanted=[mp.fd])
        assert (caught.value.pid, caught.value.fd, caught.value.tuple) == (proc.pid, mp.fd, mp.tuple)
        assert f"fd {mp.fd} of process {proc.pid} (MPTCP {mp.tuple}) is ESTABLISHED: MPTCP is not plain TCP" in str(
            caught.value)
        with pytest.raises(sockrepair.ProcessError, match="holds no TCP connection that can be moved"):
            dump(proc.pid, tmp_path / "img")
    finally:
        peer.close()
        proc.kill()
        proc.wait()


def test_urgent_data_is_refused_before_the_freeze_and_inspect_says_why(netns, tmp_path):
    proc, port = _holder(2)
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    urgent = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "accepted"
        urgent.send(b"abc")
        urgent.send(b"X", socket.MSG_OOB)
        urgent.sendall(b"def")
        mine = next(s for s in tcp_sockets(proc.pid) if s.tuple.remote_port == urgent.getsockname()[1])
        for _ in range(500):
            rows = {s.fd: name for s, _, name in inspect(proc.pid)}
            if "urgent byte" in rows[mine.fd]:
                break
        assert rows[mine.fd].startswith("ESTABLISHED, cannot be moved: ") and "(urgent data (MSG_OOB))" in rows[mine.fd]
        with pytest.raises(sockrepair.SocketStateError) as caught:
            dump(proc.pid, tmp_path / "img")
        err = caught.value
        assert (err.pid, err.fd, err.tuple) == (proc.pid, mine.fd, mine.tuple)
        assert str(err).startswith(f"fd {mine.fd} of process {proc.pid} (TCP {mine.tuple}) uses what TCP_REPAIR "
                                   "cannot move: an urgent byte b'X' not yet read")
        assert str(err).endswith("nothing was frozen")
        assert not (tmp_path / "img").exists() and sockrepair.list_locks() == []
        # accepted as a loss, the other connection moves and the report names this one
        report = dump(proc.pid, tmp_path / "img", allow_loss=True)
        assert [c["fd"] for c in report.connections] != [mine.fd] and len(report.connections) == 1
        assert [u["fd"] for u in report.lost] == [mine.fd] and "urgent byte" in report.lost[0]["reason"]
    finally:
        live.close()
        urgent.close()
        proc.kill()


def _release(copies: list[int]) -> None:
    """Our pidfd_getfd copies: out of repair mode (no window probe) and closed."""
    for copy in copies:
        with contextlib.suppress(OSError):
            repair_off(copy, probe=False)
        os.close(copy)


@pytest.mark.parametrize("program", ["stopped", "running"])
def test_a_leave_running_dump_that_finds_nothing_to_move_still_resumes_what_a_killed_move_left(netns, tmp_path,
                                                                                                 program):
    """The same, when the only connection is one no move takes: the dump refuses (nothing to move) but first takes
    that socket out of repair mode and continues the stopped program, as inspect's note promises; a --kill dump
    leaves it as it is (the next step is the user's)."""
    proc, port = _holder(1)
    urgent = socket.create_connection(("127.0.0.1", port), timeout=10)
    copies: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "accepted"
        urgent.send(b"abc")
        urgent.send(b"X", socket.MSG_OOB)
        (mine,) = (s for s in tcp_sockets(proc.pid) if s.tcp_state != 10)
        for _ in range(500):
            if "urgent byte" in {s.fd: name for s, _, name in inspect(proc.pid)}[mine.fd]:
                break
        if program == "stopped":
            os.kill(proc.pid, signal.SIGSTOP)
            _wait_stopped(proc.pid)
        with PidFd(proc.pid) as pidfd:
            copies.append(pidfd.getfd(mine.fd))
        [copy] = copies
        repair_on(copy)
        with pytest.raises(sockrepair.SocketStateError, match="urgent byte b'X' not yet read"):
            dump(proc.pid, tmp_path / "kill", after=After.KILL, quiescence=Quiescence(on_busy=OnBusy.MOVE))
        assert in_repair(copy)
        with pytest.raises(sockrepair.ProcessError) as caught:
            dump(proc.pid, tmp_path / "img", after=After.LEAVE_RUNNING, quiescence=Quiescence(on_busy=OnBusy.MOVE))
        continued = ", and the stopped process continued" if program == "stopped" else ""
        assert str(caught.value).endswith(f"; fd(s) {mine.fd} were in repair mode (an interrupted move): taken out "
                                          f"of it{continued}")
        assert "urgent byte b'X' not yet read" in str(caught.value)
        assert not in_repair(copy)
        st = stat(proc.pid)
        assert st is not None and st.state != "T"
        assert not (tmp_path / "img").exists() and not (tmp_path / "kill").exists()
        assert sockrepair.list_locks() == []
        # the connection works on: the urgent byte and the data around it are where the peer left them
        with socket.socket(fileno=os.dup(copy)) as mine_copy:
            assert recv_exactly(mine_copy, 3) == b"abc"
    finally:
        _release(copies)
        urgent.close()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("program", ["stopped", "running"])
def test_a_socket_left_in_repair_mode_that_no_move_takes_stays_so_for_inspect_and_a_dump_resumes_it(netns, tmp_path,
                                                                                                      program):
    """What a killed move leaves, with one socket the engine refuses (an urgent byte unread): the program stopped,
    its sockets in repair mode. inspect names both and leaves the refused one in repair mode (a checkpoint's
    failure path used to turn it off); a --leave-running dump resumes it with the one it moves, and the program
    goes on (running: as a move killed with its guard under ptrace leaves it)."""
    proc, port = _holder(2)
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    urgent = socket.create_connection(("127.0.0.1", port), timeout=10)
    copies: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "accepted"
        urgent.send(b"abc")
        urgent.send(b"X", socket.MSG_OOB)
        mine = next(s for s in tcp_sockets(proc.pid) if s.tuple.remote_port == urgent.getsockname()[1])
        other = next(s for s in tcp_sockets(proc.pid) if s.tuple.remote_port == live.getsockname()[1])
        for _ in range(500):
            rows = {s.fd: name for s, _, name in inspect(proc.pid)}
            if "urgent byte" in rows[mine.fd]:
                break
        if program == "stopped":
            os.kill(proc.pid, signal.SIGSTOP)
            _wait_stopped(proc.pid)
        with PidFd(proc.pid) as pidfd:
            copies += [pidfd.getfd(mine.fd), pidfd.getfd(other.fd)]
        for copy in copies:
            repair_on(copy)
        rows = {s.fd: name for s, _, name in inspect(proc.pid)}
        assert rows[mine.fd].startswith("ESTABLISHED (in repair mode), cannot be moved: ")
        assert "urgent byte b'X' not yet read" in rows[mine.fd]
        assert rows[other.fd] == "ESTABLISHED (in repair mode)"
        assert all(map(in_repair, copies))
        code, out, err = run_main("inspect", "--pid", str(proc.pid))
        assert code == 0 and all(map(in_repair, copies))
        assert "(in repair mode), cannot be moved" in out and "urgent byte" in out
        assert f"fd {other.fd:<4} 127.0.0.1:{port}->" in out and "ESTABLISHED (in repair mode)" in out
        if program == "stopped":
            assert f"is stopped with fd(s) {', '.join(map(str, sorted([mine.fd, other.fd])))} in repair mode" in err
        report = dump(proc.pid, tmp_path / "img", after=After.LEAVE_RUNNING,
                      quiescence=Quiescence(on_busy=OnBusy.MOVE))
        assert sorted(report.left_behind) == (sorted([mine.fd, other.fd]) if program == "stopped" else [])
        assert not any(map(in_repair, copies))
        st = stat(proc.pid)
        assert st is not None and st.state != "T"
    finally:
        _release(copies)
        live.close()
        urgent.close()
        proc.kill()
        proc.wait()
        proc.wait()
