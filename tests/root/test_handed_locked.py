"""`sockrepair restore -D` gives the program its connections while they are still locked: `--unix` passes them
before the unlock (a handoff that fails can then be put back), `--exec` runs the program and its guard unlocks once
the exec is done. A program that answers at once (what was kept was delivered before the handoff) sends while the
lock stands. Those segments must carry SOCCR_MARK until the unlock: dropped by the lock's output chain, the kernel
counts them sent (tcpi_bytes_sent) but nothing is in flight, so the socket arms its zero-window probe timer at its
RTO, 3 s with no RTT sample (TCP_TIMEOUT_FALLBACK), and the peer waited that long for the answer.

The unlock is held (Locker.unlock patched in the restorer; with --exec, the guard's look for the program that holds
the sockets, which comes before it marks and unlocks them: the guard inherits the patch by fork) until the test has
seen the answer arrive, so the program deterministically answers while locked. The peers' route carries rto_min 8s
so that their own timers never race the commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.lock import Locker
from sockrepair.lock.ruleset import SOCCR_MARK
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import tcp_sockets
from sockrepair.netns import NetNS
from sockrepair.state import ConnTuple
from tests.root.pairs import recv_exactly, tcp_info, wait_for
from tests.root.programs import echo_connection
from tests.root.test_keep_between import REQUEST, _dump, _kept, _slow_peer_routes

# `sockrepair restore` whose unlocks (its own with --unix) and whose guard's look for the program that holds the
# sockets (before the guard marks and unlocks them, with --exec) wait for the file GATE, after creating GATE.waiting
_HELD_UNLOCK = """
import os, sys, time
import sockrepair.move.freeze as freeze
from sockrepair.lock import Locker
from sockrepair.cli.main import main
gate = os.environ["SR_TEST_GATE"]
def held(real):
    def wait(*args, **kwargs):
        open(gate + ".waiting", "a").close()
        while not os.path.exists(gate):
            time.sleep(0.01)
        return real(*args, **kwargs)
    return wait
Locker.unlock = held(Locker.unlock)
freeze.held_elsewhere = held(freeze.held_elsewhere)
sys.exit(main(sys.argv[1:]))
"""

class Info:
    """The struct tcp_info fields these tests read (include/uapi/linux/tcp.h)."""

    def __init__(self, sock: socket.socket) -> None:
        (self.probes, self.backoff, self.unacked, self.total_retrans, self.notsent_bytes, self.bytes_sent,
         self.bytes_retrans) = tcpinfo.read(sock, "tcpi_probes", "tcpi_backoff", "tcpi_unacked",
                                            "tcpi_total_retrans", "tcpi_notsent_bytes", "tcpi_bytes_sent",
                                            "tcpi_bytes_retrans")


def _conn(client: socket.socket) -> ConnTuple:
    return ConnTuple(client.family, *client.getpeername()[:2], *client.getsockname()[:2])


def _locked(netns: str, conn: ConnTuple) -> bool:
    with Locker(netns) as locker:
        return any(r.tuple in (conn.wire(), conn.wire().reversed()) for r in locker.list_locks())


def _mark(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)


@contextmanager
def _held_restore(directory: Path, gate: Path, *how: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", _HELD_UNLOCK, "restore", "-D", str(directory), *how],
                            env=dict(os.environ, SR_TEST_GATE=str(gate)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        gate.touch()
        proc.kill()
        proc.wait()


def _answered_while_locked(ns: NetNS, client: socket.socket, restored: socket.socket, gate: Path) -> None:
    """The program's answer reaches the peer while the restore holds its unlock; the restored socket sent it once,
    with no probe, and its mark until the unlock is SOCCR_MARK."""
    wait_for(lambda: Path(f"{gate}.waiting").exists(), "the restore to reach its unlock")
    assert _locked(ns.name, _conn(client))
    wait_for(lambda: Info(restored).bytes_sent >= len(REQUEST), "the program to answer")
    # the kernel counts a segment sent before the lock's verdict: dropped, it stayed in the queue (notsent)
    info = Info(restored)
    assert (info.bytes_sent, info.notsent_bytes, info.probes, info.backoff) == (len(REQUEST), 0, 0, 0)
    assert recv_exactly(client, len(REQUEST)) == REQUEST
    assert _locked(ns.name, _conn(client))
    assert _mark(restored) == SOCCR_MARK


def _after_unlock(ns: NetNS, client: socket.socket, restored: socket.socket, program: bool) -> None:
    """Unlocked: the peer's ACK, kept by the lock, was delivered; nothing was sent twice by either side, and the
    socket has its saved mark (0) back."""
    with Locker(ns.name) as locker:
        wait_for(lambda: locker.list_locks() == [], "the unlock")
    # the guard (--exec) gives the saved mark back after its unlock and its last delivery
    wait_for(lambda: _mark(restored) == 0, "the saved mark to be given back")
    wait_for(lambda: Info(restored).unacked == 0, "the peer's ACK to be delivered")
    info = Info(restored)
    assert (info.bytes_sent, info.bytes_retrans, info.total_retrans, info.probes, info.backoff) == (
        len(REQUEST), 0, 0, 0, 0)
    assert tcp_info(client)[2] == 0
    client.sendall(b"more")
    if not program:  # the test is the --unix receiver: it echoes
        restored.sendall(recv_exactly(restored, 4))
    assert recv_exactly(client, 4) == b"more"


def test_a_unix_receiver_answering_before_the_unlock_is_not_held(ns: NetNS, tmp_path: Path) -> None:
    _slow_peer_routes(ns)
    gate = tmp_path / "gate"
    with echo_connection(ns) as (server, client), socket.socket(socket.AF_UNIX) as listener:
        _dump(server.pid, tmp_path / "img")
        client.sendall(REQUEST)
        wait_for(lambda: len(_kept(tmp_path / "img").packets) == 1, "the keeper to record the request")
        listener.bind(str(tmp_path / "r.sock"))
        listener.listen(1)
        listener.settimeout(60)
        with _held_restore(tmp_path / "img", gate, "--unix", str(tmp_path / "r.sock")) as proc:
            unix, _ = listener.accept()
            with unix:
                head, fds, _, _ = socket.recv_fds(unix, 65536, 1)
            assert json.loads(head[4:]) == [str(_conn(client))]
            with socket.socket(fileno=fds[0]) as restored:
                assert recv_exactly(restored, len(REQUEST)) == REQUEST  # delivered before the handoff
                restored.sendall(REQUEST)  # the program answers while its connection is locked
                _answered_while_locked(ns, client, restored, gate)
                gate.touch()
                assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else b""
                _after_unlock(ns, client, restored, program=False)


def test_an_exec_program_answering_before_the_guard_unlocks_is_not_held(ns: NetNS, tmp_path: Path) -> None:
    _slow_peer_routes(ns)
    gate = tmp_path / "gate"
    with echo_connection(ns) as (server, client):
        _dump(server.pid, tmp_path / "img")
        client.sendall(REQUEST)
        wait_for(lambda: len(_kept(tmp_path / "img").packets) == 1, "the keeper to record the request")
        with _held_restore(tmp_path / "img", gate, "--exec", sys.executable, str(ECHO_SERVER)) as proc:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith(b"ready"), (line, proc.stderr.read() if proc.stderr else b"")
            [held] = [s for s in tcp_sockets(proc.pid) if s.tuple == _conn(client)]
            with PidFd(proc.pid) as pidfd, socket.socket(fileno=pidfd.getfd(held.fd)) as restored:
                # the echo program answers the delivered request at once, while the guard holds the unlock
                _answered_while_locked(ns, client, restored, gate)
                gate.touch()
                _after_unlock(ns, client, restored, program=True)
