"""Fault injection: the mover (`sockrepair dump`, or a program calling migrate()) raises, gets SIGTERM or is SIGKILLed
as each named stage begins or ends (SOCKREPAIR_FAULT, sockrepair.move.stages). Afterwards the program goes on with
none of its sockets in repair mode and nothing locked, or, once the source was ended, the images left behind
restore; either way every byte of every connection arrives once and in order."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sockrepair
from sockrepair.lab.subjects import start_echo, start_receiver, stop
from sockrepair.move.dump import After, dump
from sockrepair.move.journal import stale_reason
from sockrepair.move.pidfd import PidFd
from sockrepair.move.procfs import stat, tcp_sockets
from sockrepair.move.quiesce import OnBusy, Quiescence
from sockrepair.state import TCP_ESTABLISHED
from tests.root.pairs import wait_for
from tests.root.programs import free_port
from tests.root.streams import echo_clients, echo_round

TCP_REPAIR = 19


def in_repair(pid: int) -> list[int]:
    """The fds of `pid` whose established TCP socket is in repair mode."""
    found = []
    with PidFd(pid) as pidfd:
        for s in tcp_sockets(pid):
            if s.tcp_state != TCP_ESTABLISHED:
                continue
            with socket.socket(fileno=pidfd.getfd(s.fd)) as copy:
                if copy.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR):
                    found.append(s.fd)
    return found


def _state(pid: int) -> str:
    st = stat(pid)
    return st.state if st is not None else "gone"


def _settled(pid: int) -> bool:
    """The program runs (not stopped, no socket in repair mode) and nothing is locked: what the mover's cleanup,
    or its guard once it died, leaves."""
    return _state(pid) not in ("T", "t") and not in_repair(pid) and sockrepair.list_locks() == []


def _fault_env(spec: str) -> dict[str, str]:
    return dict(os.environ, SOCKREPAIR_FAULT=spec)


def _dump_cli(pid: int, directory: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """`sockrepair dump --pid PID -D DIRECTORY EXTRA...`, with SOCKREPAIR_FAULT=`fault` when given, in a process
    group of its own (the "killgroup" action kills that group)."""
    return subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "dump", "--pid", str(pid), "-D", str(directory),
                           *extra], env=_fault_env(fault) if fault else None, capture_output=True, text=True,
                          timeout=60, start_new_session=True)


def _restore_to(receiver_sock: Path, directory: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """`sockrepair restore -D DIRECTORY --unix RECEIVER_SOCK`, as _dump_cli() runs a dump."""
    return subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "restore", "-D", str(directory), "--unix",
                           str(receiver_sock)], env=_fault_env(fault) if fault else None, capture_output=True,
                          text=True, timeout=60, start_new_session=True)


def _check_after(server: subprocess.Popen[bytes], ended: bool, images: Path, clients: list[socket.socket],
                 offsets: list[int], tmp_path: Path) -> subprocess.Popen[bytes] | None:
    """The program goes on untouched, or (ended) was SIGKILLed and its images restore into a receiver; either way
    every connection echoes on. Returns the receiver to stop."""
    if not ended:
        assert server.poll() is None, "the program was ended before the point of no return"
        wait_for(lambda: _settled(server.pid), "the program to go on with no socket in repair mode, unlocked")
        echo_round(clients, offsets, 30_000)
        if (images / "index.json").exists() or (images / "journal.json").exists():
            why = stale_reason(images)
            assert why is not None and "still running" in why
        return None
    assert server.wait(10) == -signal.SIGKILL
    assert stale_reason(images) is None
    receiver = start_receiver(tmp_path / "r.sock", max_seconds=120)
    done = _restore_to(tmp_path / "r.sock", images)
    assert done.returncode == 0, done.stderr
    echo_round(clients, offsets, 30_000)
    assert sockrepair.list_locks() == []
    return receiver


DUMP_STAGES = ["freeze", "lock", "checkpoint", "write", "kill"]
DUMP_POINTS = [p for stage in DUMP_STAGES for p in (stage, stage + ".end")]


@pytest.mark.parametrize("action", ["raise", "term", "kill"])
@pytest.mark.parametrize("point", DUMP_POINTS)
def test_dump_interrupted(netns, tmp_path, point, action):
    with echo_clients(2, 20_000) as (server, clients, offsets, stop_later):
        images = tmp_path / "img"
        run = _dump_cli(server.pid, images, fault=f"dump:{point}:{action}")
        assert run.returncode != 0, run.stdout
        if action == "kill":
            assert run.returncode == -signal.SIGKILL
        if action == "term":
            assert "interrupted by SIGTERM" in run.stderr, run.stderr
        stop_later(_check_after(server, point == "kill.end", images, clients, offsets, tmp_path))


@pytest.mark.parametrize("point", ["lock.end", "checkpoint.end"])
def test_a_group_wide_sigkill_of_a_dump_spares_its_guard(netns, tmp_path, point):
    """`kill -KILL -- -PGID` of the dump's process group (a supervisor, timeout(1)): the guard, in a group of its
    own, is not in it. It takes the sockets out of repair mode and unlocks them, and the program goes on. Killed
    with the mover, the guard left the program's connections locked until the lock's TTL, in repair mode after the
    checkpoint."""
    with echo_clients(2, 20_000) as (server, clients, offsets, _):
        images = tmp_path / "img"
        run = _dump_cli(server.pid, images, fault=f"dump:{point}:killgroup")
        assert run.returncode == -signal.SIGKILL, run.stderr
        _check_after(server, False, images, clients, offsets, tmp_path)


@pytest.mark.parametrize("point", ["restore.end", "deliver.end"])
def test_a_group_wide_sigkill_of_a_restore_spares_its_guard(netns, tmp_path, point):
    """The same for `sockrepair restore -D`: its guard, which holds the restored sockets, saves them back into the
    directory, and a second restore completes the move with every byte."""
    with echo_clients(2, 20_000) as (server, clients, offsets, stop_later):
        receiver = stop_later(start_receiver(tmp_path / "r.sock", max_seconds=120))
        images = tmp_path / "img"
        assert _dump_cli(server.pid, images).returncode == 0
        first = _restore_to(tmp_path / "r.sock", images, fault=f"restore:{point}:killgroup")
        assert first.returncode == -signal.SIGKILL, first.stderr
        again = _restore_to(tmp_path / "r.sock", images)
        assert again.returncode == 0, again.stderr
        echo_round(clients, offsets, 30_000)
        assert in_repair(receiver.pid) == []
        assert sockrepair.list_locks() == []


@pytest.mark.parametrize("action", ["raise", "kill"])
@pytest.mark.parametrize("point", ["resume", "resume.end"])
def test_dump_leave_running_interrupted(netns, tmp_path, point, action):
    with echo_clients(2, 20_000) as (server, clients, offsets, _):
        run = _dump_cli(server.pid, tmp_path / "img", "--leave-running", fault=f"dump:{point}:{action}")
        assert run.returncode != 0
        _check_after(server, False, tmp_path / "img", clients, offsets, tmp_path)


MIGRATE_SCRIPT = """
import sys
import sockrepair
from sockrepair.move.handoff import send_over_unix
pid, journal, unix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sockrepair.migrate(pid, journal=journal, network=lambda: None, keep={keep},
                   handoff=lambda socks, tuples: send_over_unix(unix, socks, tuples))
"""
MIGRATE_STAGES = ["freeze", "lock", "checkpoint", "serialize", "journal", "close", "network", "restore",
                  "deliver", "unlock", "handoff"]
MIGRATE_POINTS = [p for stage in MIGRATE_STAGES for p in (stage, stage + ".end")]
# From here on the source is ended: the journal finishes the move.
ENDED_FROM = MIGRATE_POINTS.index("close.end")
HANDED_OFF = "handoff.end"


def _migrate_cases() -> list[tuple[str, str]]:
    return [(p, action) for p in MIGRATE_POINTS for action in ("raise", "kill")]


@pytest.mark.parametrize(("point", "action"), _migrate_cases())
def test_migrate_interrupted(netns, tmp_path, point, action):
    with echo_clients(2, 20_000) as (server, clients, offsets, stop_later):
        stop_later(start_receiver(tmp_path / "handoff.sock", max_seconds=120))
        journal = tmp_path / "journal"
        run = subprocess.run([sys.executable, "-c", MIGRATE_SCRIPT.format(keep=True), str(server.pid), str(journal),
                              str(tmp_path / "handoff.sock")], env=_fault_env(f"migrate:{point}:{action}"),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode != 0
        ended = MIGRATE_POINTS.index(point) >= ENDED_FROM
        if point == HANDED_OFF:
            # the receiver already serves them: nothing to recover, and the journal says the move is done
            assert server.wait(10) == -signal.SIGKILL
            echo_round(clients, offsets, 30_000)
            assert sockrepair.list_locks() == []
            assert stale_reason(journal) == "this move completed: its connections live on elsewhere"
            return
        if ended and action == "raise":
            assert "sockrepair restore -D" in run.stderr, run.stderr
        stop_later(_check_after(server, ended, journal, clients, offsets, tmp_path))


def test_a_sigkilled_dump_never_leaves_the_program_stopped(netns, tmp_path):
    """The freeze is ptrace's (or the guard sends SIGCONT): killed while the program is frozen, the program goes on
    within the guard's cleanup, with its sockets out of repair mode."""
    with echo_clients(1, 1000) as (server, clients, offsets, _):
        run = _dump_cli(server.pid, tmp_path / "img", fault="dump:checkpoint.end:kill")
        assert run.returncode == -signal.SIGKILL
        wait_for(lambda: _settled(server.pid), "the program to go on")
        assert in_repair(server.pid) == []
        echo_round(clients, offsets, 1000)


def test_dump_of_itself_or_an_ancestor_is_refused(netns, tmp_path):
    shell = subprocess.run(["sh", "-c", f"exec {sys.executable} -m sockrepair.cli.main dump --pid $$ -D {tmp_path}"],
                           capture_output=True, text=True, timeout=60)
    assert shell.returncode == 1
    assert "is sockrepair itself" in shell.stderr
    parent = subprocess.run(["sh", "-c", f"{sys.executable} -m sockrepair.cli.main dump --pid $$ -D {tmp_path}; "
                             "echo survived"], capture_output=True, text=True, timeout=60)
    assert "an ancestor of sockrepair" in parent.stderr and parent.stdout.strip() == "survived"
    with pytest.raises(sockrepair.ProcessError, match="sockrepair itself"):
        sockrepair.migrate(os.getpid())


def test_a_program_left_stopped_in_repair_mode_is_recovered_by_a_dump(netns, tmp_path):
    """What a move leaves when sockrepair and its guard were both SIGKILLed under a SIGSTOP freeze: the program
    stopped, its sockets in repair mode. `inspect` says how to recover; a `--leave-running` dump recovers it."""
    from sockrepair.engine._repair import repair_on

    with echo_clients(2, 5000) as (server, clients, offsets, _):
        os.kill(server.pid, signal.SIGSTOP)
        wait_for(lambda: _state(server.pid) == "T", "the program to stop")
        with PidFd(server.pid) as pidfd:
            for s in tcp_sockets(server.pid):
                if s.tcp_state == TCP_ESTABLISHED:
                    fd = pidfd.getfd(s.fd)
                    repair_on(fd)
                    os.close(fd)
        stuck = in_repair(server.pid)
        assert len(stuck) == 2
        look = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "inspect", "--pid", str(server.pid)],
                              capture_output=True, text=True, timeout=60)
        assert f"process {server.pid} is stopped" in look.stderr and "--leave-running" in look.stderr
        # stopped by the test's SIGSTOP, perhaps between two waits: a quiescent freeze would wait for it in vain
        report = dump(server.pid, tmp_path / "img", after=After.LEAVE_RUNNING,
                      quiescence=Quiescence(on_busy=OnBusy.MOVE))
        assert sorted(report.left_behind) == sorted(stuck)
        wait_for(lambda: _settled(server.pid), "the program to go on")
        echo_round(clients, offsets, 20_000)


RESTORE_STAGES = ["load", "restore", "deliver", "handoff", "unlock"]
RESTORE_POINTS = [p for stage in RESTORE_STAGES for p in (stage, stage + ".end")]


def _first_restore_completes(point: str, action: str) -> bool:
    """Whether the interrupted restore got the connections to the receiver and unlocked them itself (SIGTERM is held
    back from the restore to the unlock, which then ends first) or its guard did (SIGKILL once the handoff was
    done)."""
    if point == "unlock.end":
        return True
    if action == "term":
        return not point.startswith("load")
    return action == "kill" and point in ("handoff.end", "unlock")


def _no_sockrepair_elements() -> bool:
    """`nft list ruleset` of this namespace holds no element of a sockrepair lock (the table itself may stay)."""
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    return "elements" not in ruleset


@pytest.mark.parametrize("action", ["raise", "term", "kill"])
@pytest.mark.parametrize("point", RESTORE_POINTS)
def test_restore_interrupted(netns, tmp_path, point, action):
    """`sockrepair restore -D` of a killed program's images, interrupted at each point: run again (never with
    --force), it restores what was not restored, only unlocks what an earlier run handed off, or says the move
    completed; every byte echoes once and in order, no socket is left in repair mode, nothing stays locked."""
    with echo_clients(2, 20_000) as (server, clients, offsets, stop_later):
        receiver = stop_later(start_receiver(tmp_path / "r.sock", max_seconds=120))
        images = tmp_path / "img"
        dumped = _dump_cli(server.pid, images)
        assert dumped.returncode == 0, dumped.stderr
        assert server.wait(10) == -signal.SIGKILL
        first = _restore_to(tmp_path / "r.sock", images, fault=f"restore:{point}:{action}")
        assert first.returncode != 0
        assert "Traceback" not in first.stderr, first.stderr
        if action == "kill":
            assert first.returncode == -signal.SIGKILL
        again = _restore_to(tmp_path / "r.sock", images)
        if _first_restore_completes(point, action):
            assert again.returncode == 1 and "this move completed" in again.stderr, again.stderr
        else:
            assert again.returncode == 0, (first.stderr, again.stderr)
        if action == "raise" and point in ("handoff.end", "unlock"):
            assert "handed off by an earlier restore: unlocked them" in again.stderr, again.stderr
        elif again.returncode == 0:
            assert re.search(r"restored 2 connection\(s\) from .*\(load [\d.]+ ms, restore [\d.]+ ms, deliver "
                             r"[\d.]+ ms, handoff [\d.]+ ms, unlock [\d.]+ ms\)", again.stderr), again.stderr
        elif action == "raise" and point in ("restore.end", "deliver", "deliver.end", "handoff"):
            assert "restored sockets closed silently" in first.stderr, first.stderr
        assert stale_reason(images) == "this move completed: its connections live on elsewhere"
        echo_round(clients, offsets, 30_000)
        assert in_repair(receiver.pid) == []
        assert sockrepair.list_locks() == []
        assert _no_sockrepair_elements()


@pytest.mark.parametrize("action", ["raise", "kill"])
@pytest.mark.parametrize("point", ["deliver.end", "handoff"])
def test_restore_exec_interrupted_before_the_exec(netns, tmp_path, point, action):
    """`restore --exec` stopped before the exec: the connections are put back (locked, closed silently), and a
    second restore (here over --unix) brings every one of them back."""
    with echo_clients(2, 20_000) as (server, clients, offsets, stop_later):
        receiver = stop_later(start_receiver(tmp_path / "r.sock", max_seconds=120))
        images = tmp_path / "img"
        dumped = _dump_cli(server.pid, images)
        assert dumped.returncode == 0, dumped.stderr
        first = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "restore", "-D", str(images), "--exec",
                                "cat"], env=_fault_env(f"restore:{point}:{action}"), capture_output=True, text=True,
                               timeout=60)
        assert first.returncode == (1 if action == "raise" else -signal.SIGKILL), first.stderr
        again = _restore_to(tmp_path / "r.sock", images)
        assert again.returncode == 0, (first.stderr, again.stderr)
        echo_round(clients, offsets, 30_000)
        assert in_repair(receiver.pid) == []
        assert sockrepair.list_locks() == []


FORK_TERM_SCRIPT = """
import os, signal, sys
from sockrepair.cli.main import main
sent = []
def term_once():
    if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
os.register_at_fork(before=term_once)
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigterm_during_the_guards_fork_interrupts_the_dump(netns, tmp_path):
    """SIGTERM arriving as the guard is forked (here: from an at-fork hook) ends the dump like any SIGTERM: the
    program goes on untouched. Before, the handler ran inside Python's at-fork hooks, which printed its exception
    and dropped it: the dump went on, killed the program and exited 0."""
    with echo_clients(1, 1000) as (server, clients, offsets, _):
        run = subprocess.run([sys.executable, "-c", FORK_TERM_SCRIPT, "dump", "--pid", str(server.pid), "-D",
                              str(tmp_path / "img")], capture_output=True, text=True, timeout=60)
        assert run.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in run.stderr, run.stderr
        assert "Exception ignored" not in run.stderr
        assert server.poll() is None
        wait_for(lambda: _settled(server.pid), "the program to go on")
        echo_round(clients, offsets, 1000)


@pytest.mark.parametrize("point", ["freeze", "freeze.end", "checkpoint.end"])
def test_ctrl_c_in_a_dump_is_one_line(netns, tmp_path, point):
    """Ctrl-C (SIGINT) as a stage of the freeze begins or ends: "sockrepair: interrupted", nothing else (before,
    at the end of the freeze, the guard's closed socket was used once more: "Exception ignored ... EBADF")."""
    with echo_clients(1, 1000) as (server, clients, offsets, _):
        run = _dump_cli(server.pid, tmp_path / "img", fault=f"dump:{point}:int")
        assert run.returncode == 130
        lines = [ln for ln in run.stderr.splitlines() if "RuntimeWarning" not in ln]
        assert lines == ["sockrepair: interrupted by SIGINT"] or lines == ["sockrepair: interrupted"], run.stderr
        wait_for(lambda: _settled(server.pid), "the program to go on")
        echo_round(clients, offsets, 1000)


def test_dump_of_a_listening_socket_names_it(netns, tmp_path):
    port = free_port()
    server = start_echo(f"127.0.0.1:{port}")
    try:
        listening = [s.fd for s in tcp_sockets(server.pid)]
        run = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "dump", "--pid", str(server.pid), "--fd",
                              str(listening[0]), "-D", str(tmp_path / "img")], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 1
        assert f"fd {listening[0]} of process {server.pid} (TCP 127.0.0.1:{port}->0.0.0.0:0) is LISTEN" in run.stderr
        assert run.stderr.count("sockrepair: error:") == 1 and "Traceback" not in run.stderr
        assert server.poll() is None and not (tmp_path / "img").exists()
    finally:
        stop(server)


DEFAULT_JOURNAL_SCRIPT = """
import logging, sys
import sockrepair
from sockrepair.move.handoff import send_over_unix
logging.basicConfig(level=logging.INFO)
pid, unix = int(sys.argv[1]), sys.argv[2]
sockrepair.migrate(pid, network=lambda: None, handoff=lambda socks, tuples: send_over_unix(unix, socks, tuples))
"""


def test_a_killed_migrate_says_where_its_journal_is_and_restore_lists_it(netns, tmp_path):
    """migrate() with its own journal, SIGKILLed once the program is ended: it said where the journal is before
    that (a log line), `sockrepair restore --pending` lists the journal by the program's pid, and -D of it finishes
    the move."""
    with echo_clients(2, 20_000) as (server, clients, offsets, stop_later):
        stop_later(start_receiver(tmp_path / "r.sock", max_seconds=120))
        journal = None
        try:
            run = subprocess.run([sys.executable, "-c", DEFAULT_JOURNAL_SCRIPT, str(server.pid),
                                  str(tmp_path / "r.sock")], env=_fault_env("migrate:close.end:kill"),
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == -signal.SIGKILL
            said = [line for line in run.stderr.splitlines() if "journal: " in line]
            assert len(said) == 1, run.stderr
            journal = Path(said[0].rpartition("journal: ")[2])
            assert journal.name.startswith(f"move-{server.pid}-")

            def listed() -> list[dict[str, object]]:
                out = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "restore", "--pending", "--json"],
                                     capture_output=True, text=True, timeout=60, check=True).stdout
                return [p for p in json.loads(out) if p["directory"] == str(journal)]

            wait_for(lambda: [p["in_progress"] for p in listed()] == [False], "the guard to let the journal go")
            (entry,) = listed()
            assert entry["pid"] == server.pid and entry["connections"] == 2 and entry["stale"] is None
            text = subprocess.run([sys.executable, "-m", "sockrepair.cli.main", "restore", "--pending"],
                                  capture_output=True, text=True, timeout=60).stdout
            assert f"{journal}: 2 connection(s) of process {server.pid}" in text
            assert f"sockrepair restore -D {journal} --unix PATH" in text
            done = _restore_to(tmp_path / "r.sock", journal)
            assert done.returncode == 0, done.stderr
            echo_round(clients, offsets, 30_000)
            assert listed() == []
            assert sockrepair.list_locks() == []
        finally:
            if journal is not None:
                shutil.rmtree(journal, ignore_errors=True)


NO_HANDOFF_SCRIPT = """
import os
import signal
import sys
import sockrepair
from sockrepair.move import freeze
pid, journal = int(sys.argv[1]), sys.argv[2] or None
# killed once the move is marked completed, before its guard is let go
freeze.Freezer.release = lambda self: os.kill(os.getpid(), signal.SIGKILL)
sockrepair.migrate(pid, journal=journal, network=lambda: None)
"""


@pytest.mark.parametrize("given", [False, True], ids=["default-journal", "given-journal"])
def test_a_mover_killed_after_completing_a_move_without_handoff_tells_the_peers_at_once(netns, tmp_path, given):
    """Without a handoff the restored sockets are the caller's: a caller SIGKILLed between marking the move
    completed and letting its guard go takes them with it. The guard must not lock them again and save them into
    a journal that is gone, or marked completed: the peers would hear nothing until the lock's TTL (60 s). They read
    the end of their connections now, and nothing stays locked."""
    with echo_clients(2, 20_000) as (server, clients, offsets, stop_later):
        journal = tmp_path / "journal" if given else None
        run = subprocess.run([sys.executable, "-c", NO_HANDOFF_SCRIPT, str(server.pid), str(journal or "")],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert server.wait(10) == -signal.SIGKILL
        for c in clients:
            c.settimeout(10)
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:
                pass  # unread bytes in the closed socket: a reset, told as well
        wait_for(lambda: sockrepair.list_locks() == [], "no connection locked")
        if journal is not None:
            assert stale_reason(journal) == "this move completed: its connections live on elsewhere"
        else:
            assert not list(Path("/run/sockrepair").glob(f"move-{server.pid}-*"))


def _reuseaddr(pid: int) -> list[int]:
    """SO_REUSEADDR of each established TCP socket of `pid`."""
    values = []
    with PidFd(pid) as pidfd:
        for s in tcp_sockets(pid):
            if s.tcp_state == TCP_ESTABLISHED:
                with socket.socket(fileno=pidfd.getfd(s.fd)) as copy:
                    values.append(copy.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
    return values


@pytest.mark.parametrize("point", ["checkpoint.end", "write"])
def test_the_guard_gives_back_so_reuseaddr(netns, tmp_path, point):
    """The echo program's connections inherit SO_REUSEADDR from its listener; leaving repair mode clears it. The
    guard of a SIGKILLed dump sets it again on the sockets it resumes (it did not before)."""
    with echo_clients(2, 1000) as (server, clients, offsets, _):
        assert _reuseaddr(server.pid) == [1, 1]
        run = _dump_cli(server.pid, tmp_path / "img", fault=f"dump:{point}:kill")
        assert run.returncode == -signal.SIGKILL
        wait_for(lambda: _settled(server.pid), "the program to go on")
        assert _reuseaddr(server.pid) == [1, 1]
        echo_round(clients, offsets, 1000)


def test_a_restore_after_a_partial_handoff_restores_only_the_rest(netns, tmp_path):
    """What a guard leaves when the restore was killed in the middle of a handoff: one connection in the receiver
    (recorded in `handed`, still locked), the other put back. Restoring again unlocks the first and restores only
    the second: each connection exists once and echoes every byte in order."""
    from sockrepair.move.handoff import send_over_unix
    from sockrepair.move.journal import HANDED, load_states, mark_handed

    with echo_clients(2, 20_000) as (server, clients, offsets, stop_later):
        receiver = stop_later(start_receiver(tmp_path / "r.sock", max_seconds=120))
        images = tmp_path / "img"
        dumped = _dump_cli(server.pid, images)
        assert dumped.returncode == 0, dumped.stderr
        first, second = load_states(images)
        with sockrepair.restore(first) as sock:
            send_over_unix(str(tmp_path / "r.sock"), [sock], [first.tuple])
        mark_handed(images, [first.tuple])
        assert [r.tuple for r in sockrepair.list_locks()] == sorted([first.tuple, second.tuple])
        again = _restore_to(tmp_path / "r.sock", images)
        assert again.returncode == 0, again.stderr
        assert "1 connection(s) of" in again.stderr and "handed off by an earlier restore: unlocked them; " \
            "restoring the 1 other(s)" in again.stderr
        assert "restored 1 connection(s)" in again.stderr
        assert (images / HANDED).exists() and stale_reason(images) == \
            "this move completed: its connections live on elsewhere"
        echo_round(clients, offsets, 30_000)
        assert len([s for s in tcp_sockets(receiver.pid) if s.tcp_state == TCP_ESTABLISHED]) == 2
        assert in_repair(receiver.pid) == [] and sockrepair.list_locks() == []
