"""Between `sockrepair dump` and `sockrepair restore -D` a detached keeper goes on keeping what the peers send: a
request sent after the dump returned reaches the restored program without the peer retransmitting it (its
tcpi_total_retrans stays 0), in one namespace and from lab host A to B. The peers' minimum RTO is raised to 8 s
through their route (`rto_min`, which also delays the tail-loss probe), so that the two commands and the Python
start-ups between them never race the peer's timers: without the keeper the request would wait those 8 s, and the
peer's retransmission counter would show it. A keeper killed with SIGKILL leaves the lock dropping (no RST), the
restore still works and the request comes by the peer's retransmission; a damaged kept.img is an ImageError."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import sockrepair
from sockrepair.engine import _tcpinfo as tcpinfo
from sockrepair.image.directory import read_dir
from sockrepair.image.keptlog import NAME as KEPT
from sockrepair.image.keptlog import KeptLog, decode_keptlog
from sockrepair.lab.hosts import SERVICE4, Lab
from sockrepair.lab.programs import ECHO_SERVER
from sockrepair.lab.recorder import Recorder as WireRecorder
from sockrepair.lock import Locker
from sockrepair.lock.record import Recorder
from sockrepair.lock.ruleset import NFLOG_GROUP
from sockrepair.move import keeper as keeper_module
from sockrepair.move.keep import REDELIVER, read_kept
from sockrepair.move.keeper import LATER, RECORD
from sockrepair.move.land import restore_all, unlock_in
from sockrepair.move.procfs import stat
from sockrepair.netns import NetNS, named
from sockrepair.state import ConnTuple
from tests.root.pairs import recv_exactly, tcp_info, wait_for
from tests.root.programs import echo_connection

REQUEST = b"GET /between-the-commands"
CLI = [sys.executable, "-m", "sockrepair.cli.main"]


def _kept(directory: Path) -> KeptLog:
    return decode_keptlog((directory / KEPT).read_bytes())


def _keeper_pid(directory: Path) -> int:
    return int(json.loads((directory / RECORD).read_text())["pid"])


def _alive(pid: int) -> bool:
    proc = stat(pid)
    return proc is not None and not proc.zombie


def _dump(pid: int, directory: Path, *extra: str) -> dict[str, object]:
    done = subprocess.run([*CLI, "dump", "--pid", str(pid), "-D", str(directory), "--json", *extra],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def _dump_and_keep_a_request(pid: int, client: socket.socket, directory: Path) -> int:
    """`sockrepair dump` of `pid`, then REQUEST from `client` until the keeper recorded it: the keeper's pid."""
    _dump(pid, directory)
    keeper = _keeper_pid(directory)
    client.sendall(REQUEST)
    wait_for(lambda: len(_kept(directory).packets) == 1, "the keeper to record the request")
    return keeper


@contextmanager
def _restored(directory: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """`sockrepair restore -D directory ... --exec` the echo program; yields once it serves the connections."""
    proc = subprocess.Popen([*CLI, "restore", "-D", str(directory), *extra, "--exec", sys.executable,
                             str(ECHO_SERVER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(b"ready"), (line, proc.stderr.read() if proc.stderr else b"")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _unacked(sock: socket.socket) -> int:
    """tcpi_unacked: segments sent and not acknowledged."""
    return tcpinfo.read(sock, "tcpi_unacked")[0]


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None
    return proc.stderr.read().decode()


def _slow_peer_routes(ns: NetNS) -> None:
    ns.ip("route", "replace", "table", "local", "local", "127.0.0.1", "dev", "lo", "proto", "kernel", "scope", "host",
          "src", "127.0.0.1", "rto_min", "8s")
    # an IPv6 route given metric 0 is added beside the kernel's (as 1024), not in its place
    ns.ip("-6", "route", "del", "table", "local", "local", "::1", "dev", "lo")
    ns.ip("-6", "route", "add", "table", "local", "local", "::1", "dev", "lo", "proto", "kernel", "rto_min", "8s")


def _out_rsts(netns: str) -> int:
    with named(netns), open("/proc/thread-self/net/snmp") as f:
        head, values = [line.split() for line in f if line.startswith("Tcp:")]
    return int(values[head.index("OutRsts")])


@pytest.mark.parametrize("listen,connect", [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("::", "127.0.0.1")],
                         ids=["ipv4", "ipv6", "v4-mapped"])
def test_a_request_sent_between_dump_and_restore_arrives_without_retransmission(ns: NetNS, tmp_path: Path,
                                                                                listen: str, connect: str) -> None:
    _slow_peer_routes(ns)
    with echo_connection(ns, listen, connect) as (server, client):
        conn = ConnTuple(client.family, *client.getsockname()[:2], *client.getpeername()[:2])
        report = _dump(server.pid, tmp_path / "img")
        keeper = _keeper_pid(tmp_path / "img")
        assert f"a keeper (pid {keeper})" in str(report["kept"])
        assert _alive(keeper) and (tmp_path / "img" / KEPT).stat().st_mode & 0o777 == 0o600
        with WireRecorder("lo", ns.name) as wire:
            client.sendall(REQUEST)  # after the dump has ended: only the keeper records now
            wait_for(lambda: len(_kept(tmp_path / "img").packets) == 1, "the keeper to record the request")
            with _restored(tmp_path / "img") as restored:
                assert recv_exactly(client, len(REQUEST)) == REQUEST  # echoed by the restored program
                assert tcp_info(client)[2] == 0
                client.sendall(b"more")
                assert recv_exactly(client, 4) == b"more"
                wire.stop()
        assert "delivered 1 packet(s)" in _stderr(restored)
        # on the wire: the request when the peer sent it, and its copy when the restore delivered it
        seen = wire.report(conn).directions[0]
        assert (seen.delivered, seen.retransmitted_bytes, seen.rst) == (1, 0, 0)
        wait_for(lambda: not _alive(keeper), "the keeper to leave", 5.0)
        log = _kept(tmp_path / "img")
        assert log.end is not None and log.end.startswith("handed over to process ") and log.fell_back == 0
        with Locker(ns.name) as locker:
            assert locker.list_locks() == []


def test_a_migrate_while_a_keeper_waits_keeps_its_own_requests_too(ns: NetNS, tmp_path: Path) -> None:
    """A dump's keeper holds its recorder (and group) in the namespace until the restore; a migrate() there meanwhile
    records on a group of its own: its peer's request is delivered without retransmission, the keeper keeps only
    its own peer's, and the restore then delivers that one. With one group per namespace the migrate() moved with
    the dropping lock, and its peer waited its retransmission timeout (8 s here)."""
    _slow_peer_routes(ns)
    with echo_connection(ns) as (dumped, client_a), echo_connection(ns) as (migrated, client_b):
        _dump(dumped.pid, tmp_path / "img")
        keeper = _keeper_pid(tmp_path / "img")
        client_a.sendall(REQUEST)
        wait_for(lambda: len(_kept(tmp_path / "img").packets) == 1, "the keeper to record the request")
        report = sockrepair.migrate(migrated.pid, dest_netns=ns.name, network=lambda: client_b.sendall(b"GET /moving"),
                                    handoff=lambda socks, _tuples: socks, keep=True)
        [restored_b] = report.handoff_result
        with restored_b:
            assert recv_exactly(restored_b, 11) == b"GET /moving"
            assert tcp_info(client_b)[2] == 0
        assert (report.kept.recording, report.kept.delivered, report.kept.fell_back) == (True, 1, 0)
        assert _alive(keeper)
        [kept] = _kept(tmp_path / "img").packets
        assert kept.endswith(REQUEST)  # the keeper's one packet is its own peer's request, whole
        with _restored(tmp_path / "img"):
            assert recv_exactly(client_a, len(REQUEST)) == REQUEST
            assert tcp_info(client_a)[2] == 0


def test_kept_by_the_keeper_at_host_a_delivered_at_host_b(tmp_path: Path) -> None:
    """The request reaches A's lock after the dump ended; the keeper on A keeps it; the service address moves, the
    connection is restored on B and the request delivered there."""
    with Lab() as lab:
        lab.peer.ip("route", "replace", "198.18.0.0/24", "dev", "eth0", "proto", "kernel", "scope", "link", "src",
                    "198.18.0.1", "rto_min", "8s")
        with echo_connection(lab.a.ns, SERVICE4, peer=lab.peer.ns, port=7009) as (server, client):
            _dump(server.pid, tmp_path / "img")
            client.sendall(REQUEST)
            wait_for(lambda: len(_kept(tmp_path / "img").packets) == 1, "the keeper to record the request")
            lab.move_service("a", "b")
            with _restored(tmp_path / "img", "--netns", lab.b.name):
                assert recv_exactly(client, len(REQUEST)) == REQUEST
                assert tcp_info(client)[2] == 0


@pytest.mark.parametrize("lock_on_b", [True, False], ids=["locked-on-b", "not-locked-on-b"])
def test_locked_on_host_b_before_the_address_moves_no_peer_is_reset(tmp_path: Path, lock_on_b: bool) -> None:
    """docs/migration.md's order for a dump restored on another host by hand: the connection locked on B (`sockrepair
    lock --netns B`), then the service address moved, a request sent then (dropped by B's lock: not kept, not
    reset), then `restore -D --netns B`: the request comes with the peer's retransmission. Without the lock on B,
    B resets the connection as soon as the request reaches it."""
    with Lab() as lab:
        with echo_connection(lab.a.ns, SERVICE4, peer=lab.peer.ns, port=7010) as (server, client):
            _dump(server.pid, tmp_path / "img")
            if lock_on_b:
                tuples = [str(state.tuple) for _, state in read_dir(tmp_path / "img")]
                locked = subprocess.run([*CLI, "lock", "--netns", lab.b.name, *tuples], capture_output=True,
                                        text=True, timeout=60)
                assert locked.returncode == 0, locked.stderr
            lab.move_service("a", "b")
            resets = _out_rsts(lab.b.name)
            client.sendall(REQUEST)
            if not lock_on_b:
                with pytest.raises(ConnectionResetError):
                    client.settimeout(10)
                    client.recv(1)
                assert _out_rsts(lab.b.name) == resets + 1
                return
            wait_for(lambda: tcp_info(client)[2] >= 1, "the peer to retransmit", 10.0)
            with _restored(tmp_path / "img", "--netns", lab.b.name):
                assert recv_exactly(client, len(REQUEST)) == REQUEST
                client.sendall(REQUEST)
                assert recv_exactly(client, len(REQUEST)) == REQUEST
            assert _out_rsts(lab.b.name) == resets
            with Locker(lab.b.name) as locker:
                assert locker.list_locks() == []


def test_a_killed_keeper_leaves_the_lock_dropping_and_the_restore_works(ns: NetNS, tmp_path: Path) -> None:
    with echo_connection(ns) as (server, client):
        _dump(server.pid, tmp_path / "img")
        keeper = _keeper_pid(tmp_path / "img")
        os.kill(keeper, signal.SIGKILL)
        wait_for(lambda: not _alive(keeper), "the keeper to die", 5.0)
        resets = _out_rsts(ns.name)
        client.sendall(REQUEST)
        # dropped by the lock, kept by nobody: the peer sends it again after its timeout, dropped again
        wait_for(lambda: tcp_info(client)[2] >= 1, "the peer to retransmit", 10.0)
        with Locker(ns.name) as locker:
            assert len(locker.list_locks()) == 1  # the lock holds on without its keeper
        assert _out_rsts(ns.name) == resets
        with _restored(tmp_path / "img") as restored:
            assert recv_exactly(client, len(REQUEST)) == REQUEST  # by a later retransmission
        assert "was gone" in _stderr(restored)
        assert _out_rsts(ns.name) == resets
        log = _kept(tmp_path / "img")
        assert (log.packets, log.end) == ([], None)


@pytest.mark.parametrize("killed", [False, True], ids=["keeper-ends", "keeper-killed"])
def test_the_lock_expires_and_the_keeper_with_it(ns: NetNS, tmp_path: Path, killed: bool) -> None:
    """The keeper ends with its lock (the dump's --ttl); killed, it leaves the lock to expire just the same."""
    with echo_connection(ns) as (server, client):
        _dump(server.pid, tmp_path / "img", "--ttl", "2")
        keeper = _keeper_pid(tmp_path / "img")
        if killed:
            os.kill(keeper, signal.SIGKILL)
        with Locker(ns.name) as locker:
            assert len(locker.list_locks()) == 1
            wait_for(lambda: locker.list_locks() == [], "the lock to expire", 10.0)
        wait_for(lambda: not _alive(keeper), "the keeper to end with the lock", 10.0)
        # which of its two looks saw the end first is a matter of timing: its own deadline, or the lock's
        assert _kept(tmp_path / "img").end in (
            [None] if killed else ["the lock expired", "none of its connections is locked any more"])


def test_a_wrong_target_or_namespace_leaves_the_keeper_keeping(ns: NetNS, tmp_path: Path) -> None:
    """A restore refused for its handoff's target or a namespace that does not exist takes nothing from the keeper
    (it took the keeper over before the namespace was checked: what the peers sent next waited for retransmission)."""
    _slow_peer_routes(ns)  # the request is kept once: no retransmission of it comes meanwhile
    with echo_connection(ns) as (server, client):
        _dump(server.pid, tmp_path / "img")
        keeper = _keeper_pid(tmp_path / "img")
        for extra, error in [(["--netns", "no-such-ns"], "no network namespace at /run/netns/no-such-ns"),
                             (["--unix", str(tmp_path / "none.sock")], "cannot pass the connections over")]:
            done = subprocess.run([*CLI, "restore", "-D", str(tmp_path / "img"), *extra,
                                   *(["--exec", "true"] if "--unix" not in extra else [])],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 1 and f"sockrepair: error: {error}" in done.stderr, done.stderr
            assert _alive(keeper) and _kept(tmp_path / "img").end is None
        client.sendall(REQUEST)
        wait_for(lambda: len(_kept(tmp_path / "img").packets) == 1, "the keeper to record the request")
        with _restored(tmp_path / "img"):
            assert recv_exactly(client, len(REQUEST)) == REQUEST


def test_what_a_put_back_restore_delivered_is_delivered_again(ns: NetNS, tmp_path: Path) -> None:
    """A restore stopped after its deliver stage puts the connection back, but its socket's ACKs of what it was
    delivered passed the lock: the peer will not send that again. The request held back by Nagle until the kept
    one is acknowledged reaches only that restore's own recorder; the restore run again delivers it from
    redeliver.img (it was lost: the peer saw it acknowledged, the program never got it)."""
    _slow_peer_routes(ns)  # no retransmission carries the held-back request into kept.img meanwhile
    with echo_connection(ns) as (server, client):
        _dump(server.pid, tmp_path / "img")
        client.sendall(REQUEST)
        wait_for(lambda: len(_kept(tmp_path / "img").packets) == 1, "the keeper to record the request")
        client.sendall(b"second")  # Nagle holds it until the request is acknowledged
        done = subprocess.run([*CLI, "restore", "-D", str(tmp_path / "img"), "--exec", "true"],
                              env=dict(os.environ, SOCKREPAIR_FAULT="restore:deliver.end:raise"),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "fault injected at restore deliver.end" in done.stderr, done.stderr
        # both acknowledged by the socket that was put back: the peer has nothing left to send
        wait_for(lambda: _unacked(client) == 0, "the peer to see both acknowledged", 5.0)
        with _restored(tmp_path / "img"):
            assert recv_exactly(client, len(REQUEST) + 6) == REQUEST + b"second"


def test_a_damaged_kept_file_is_an_image_error(ns: NetNS, tmp_path: Path) -> None:
    _slow_peer_routes(ns)  # the request is kept once: no retransmission of it comes meanwhile
    with echo_connection(ns) as (server, client):
        keeper = _dump_and_keep_a_request(server.pid, client, tmp_path / "img")
        path = tmp_path / "img" / KEPT
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF  # in the request's payload
        path.write_bytes(bytes(data))
        done = subprocess.run([*CLI, "restore", "-D", str(tmp_path / "img"), "--exec", "true"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert "sockrepair: error: " in done.stderr and "record 0 is damaged (CRC mismatch)" in done.stderr
        assert "Traceback" not in done.stderr
        assert not _alive(keeper)  # it handed over before the file was read
        with Locker(ns.name) as locker:
            assert len(locker.list_locks()) == 1  # nothing was restored: the connection waits, locked
        # as the error's note says: without kept.img the restore goes on, the request comes by retransmission
        assert f"remove {path} to restore them without those packets" in done.stderr
        path.unlink()
        with _restored(tmp_path / "img") as restored:
            assert recv_exactly(client, len(REQUEST)) == REQUEST
            client.sendall(b"more")
            assert recv_exactly(client, 4) == b"more"
        assert f"{path} was removed: what it kept comes by the peers' retransmission" in _stderr(restored)
        assert tcp_info(client)[2] >= 1


def test_the_keeper_leaves_once_its_connections_are_released(ns: NetNS, tmp_path: Path) -> None:
    """Restored through the library (restore_all, unlock) rather than `restore -D`, nobody asks the keeper: it sees
    the lock released and leaves, freeing the log group for the next mover in the namespace."""
    with echo_connection(ns) as (server, client):
        _dump(server.pid, tmp_path / "img")
        keeper = _keeper_pid(tmp_path / "img")
        states = [s for _, s in read_dir(tmp_path / "img")]
        [restored] = restore_all(states, ns.name)
        with restored:
            assert _alive(keeper)
            unlock_in(ns.name, states)
            wait_for(lambda: not _alive(keeper), "the keeper to leave", 10.0)
            assert _kept(tmp_path / "img").end == "none of its connections is locked any more"
            with ns.entered(), Recorder() as recorder:
                assert recorder.group == NFLOG_GROUP  # the keeper's group is free again
            client.sendall(b"after")
            assert recv_exactly(restored, 5) == b"after"


def test_a_keeper_that_does_not_answer_is_killed(ns: NetNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped keeper (SIGSTOP) cannot hand over: the restore waits ANSWER_TIMEOUT, kills it and goes on with what
    kept.img holds, so that the log group is free and nothing records behind the restore's back."""
    _slow_peer_routes(ns)  # the request is kept once: no retransmission of it comes meanwhile
    with echo_connection(ns) as (server, client):
        keeper = _dump_and_keep_a_request(server.pid, client, tmp_path / "img")
        os.kill(keeper, signal.SIGSTOP)
        monkeypatch.setattr(keeper_module, "ANSWER_TIMEOUT", 0.5)
        states = [s for _, s in read_dir(tmp_path / "img")]
        taken = keeper_module.take_over(tmp_path / "img", [s.tuple for s in states])
        assert "did not answer: killed" in taken.note and taken.recorders == []
        assert len(taken.packets) == 1 and taken.packets == _kept(tmp_path / "img").packets
        wait_for(lambda: not _alive(keeper), "the keeper to die", 5.0)
        with ns.entered(), Recorder() as recorder:
            assert recorder.group == NFLOG_GROUP  # the keeper's group is free for the restore


# `sockrepair restore` whose exec pauses once the restorer delivered what was kept, until a line on its stdin
_PAUSED_BEFORE_EXEC = """
import sys
import sockrepair.cli.move as move
from sockrepair.cli.main import main
real = move.exec_with_sockets
def paused(*args, **kwargs):
    print("delivered", flush=True)
    sys.stdin.readline()
    return real(*args, **kwargs)
move.exec_with_sockets = paused
sys.exit(main(sys.argv[1:]))
"""


def test_a_request_sent_before_the_exec_is_delivered_by_the_guard(ns: NetNS, tmp_path: Path) -> None:
    """`restore --exec` hands the sockets over still locked, and its guard unlocks them once the program holds them.
    A request sent after the restorer's delivery and before the exec is kept by the lock; the guard delivers it
    with its unlock, so the peer does not resend it (with the peer's rto_min of 8 s it used to arrive 8 s later,
    by a retransmission)."""
    _slow_peer_routes(ns)
    with echo_connection(ns) as (server, client):
        _dump(server.pid, tmp_path / "img")
        proc = subprocess.Popen([sys.executable, "-c", _PAUSED_BEFORE_EXEC, "restore", "-D", str(tmp_path / "img"),
                                 "--exec", sys.executable, str(ECHO_SERVER)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline() == b"delivered\n", _stderr(proc)
            client.sendall(REQUEST)  # locked: kept by the restorer's recorder, which the guard holds too
            assert _unacked(client) == 1
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().startswith(b"ready")
            assert recv_exactly(client, len(REQUEST)) == REQUEST
            assert tcp_info(client)[2] == 0
            with Locker(ns.name) as locker:
                wait_for(lambda: locker.list_locks() == [], "the guard to unlock", 5.0)
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("fault", ["deliver.end:raise", "restore:raise", "deliver.end:kill"],
                         ids=["put-back", "nothing-restored", "killed"])
def test_a_restore_put_back_hands_the_keeping_to_a_new_keeper(ns: NetNS, tmp_path: Path, fault: str) -> None:
    """A restore that took the keeper over and failed (a fault once it delivered: its sockets put back; as it began
    to restore: nothing restored; SIGKILLed once it delivered: its guard puts the sockets back) hands its recorders
    to a new keeper, which keeps what the peer sends until the next restore (kept-later.img); that restore delivers
    it and folds it into redeliver.img. They used to be closed: the request was dropped until the next restore and
    came by the peer's retransmission (8 s later here: tcpi_total_retrans 1)."""
    _slow_peer_routes(ns)
    images = tmp_path / "img"
    with echo_connection(ns) as (server, client):
        conn = ConnTuple(client.family, *client.getpeername()[:2], *client.getsockname()[:2])
        _dump(server.pid, images)
        first = subprocess.run([*CLI, "restore", "-D", str(images), "--exec", sys.executable, str(ECHO_SERVER)],
                               env=dict(os.environ, SOCKREPAIR_FAULT=f"restore:{fault}"),
                               capture_output=True, text=True, timeout=120)
        stage, action = fault.rsplit(":", 1)
        if action == "kill":  # its guard, which holds its stderr until done, says what it did
            assert first.returncode == -signal.SIGKILL and "put back, still locked" in first.stderr, first.stderr
        else:
            assert first.returncode == 1 and f"fault injected at restore {stage}" in first.stderr, first.stderr
        dumps_keeper = _kept(images).end
        assert dumps_keeper is not None and dumps_keeper.startswith("handed over to process ")
        keeper = _keeper_pid(images)
        assert f"a keeper (pid {keeper}) keeps what their peers send meanwhile" in first.stderr
        assert _alive(keeper) and (images / LATER).stat().st_mode & 0o777 == 0o600
        client.sendall(REQUEST)  # locked again since the put back
        wait_for(lambda: len(decode_keptlog((images / LATER).read_bytes()).packets) == 1,
                 "the new keeper to record the request")
        with _restored(images) as restored:
            assert recv_exactly(client, len(REQUEST)) == REQUEST
            assert tcp_info(client)[2] == 0
        assert "delivered" in _stderr(restored)
        assert not (images / LATER).exists() and not (images / RECORD).exists()
        assert read_kept(images, [conn], REDELIVER)[-1].endswith(REQUEST)  # an IPv4 packet: its payload ends it
        wait_for(lambda: not _alive(keeper), "the new keeper to leave", 5.0)
        with Locker(ns.name) as locker:
            assert locker.list_locks() == []
