"""The whole `sockrepair` command in-process on bad input (no root needed): each is a one-line `sockrepair: error:`
with exit 1, or an argparse usage error with exit 2, never a traceback; with --json the error is also a JSON object
on stdout. Also the text and JSON views the commands share, and that the library never imports the CLI."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sockrepair.cli.output import error_object
from sockrepair.errors import ImageError, SocketCallError, SocketStateError
from sockrepair.image.text import state_lines
from sockrepair.state import (
    ConnectionState,
    ConnTuple,
    RepairWindow,
    SocketOptions,
    TcpOptions,
)
from tests.clihelp import run_main

PACKAGE = Path(__file__).resolve().parents[2] / "sockrepair"
DATA = Path(__file__).resolve().parent.parent / "data" / "criu"
TUPLE = "127.0.0.1:5000->127.0.0.1:6000"


def error_line(*argv: str) -> str:
    """The one line a failing command prints, checking that it is one line, exit 1 and nothing on stdout."""
    code, out, err = run_main(*argv)
    assert code == 1, (code, out, err)
    assert out == ""
    assert err.startswith("sockrepair: error: ") and err.count("\n") == 1, err
    return err


def usage_error(*argv: str) -> str:
    """The one line a usage error prints: `sockrepair[ SUBCOMMAND]: error: ...`, exit 2, no usage block."""
    code, out, err = run_main(*argv)
    assert code == 2 and out == "", (code, out, err)
    assert re.match(r"sockrepair( [a-z]+)*: error: ", err) and err.count("\n") == 1, err
    return err


def a_state(window: bool = True, **sockopts: object) -> ConnectionState:
    return ConnectionState(
        tuple=ConnTuple(socket.AF_INET, "10.0.0.1", 5000, "10.0.0.2", 6000),
        tcp_state=1,
        send_seq=1000,
        recv_seq=2000,
        send_queue=b"abcdef",
        unsent_len=2,
        recv_queue=b"xyz",
        options=TcpOptions(mss=1448, sack=True, timestamps=False, wscale=True, snd_wscale=7, rcv_wscale=6),
        window=RepairWindow(snd_wl1=2000, snd_wnd=64000, max_window=65000, rcv_wnd=62000, rcv_wup=2000)
        if window else None,
        timestamp=123456,
        sockopts=SocketOptions(**sockopts),  # type: ignore[arg-type]
    )


def test_show_of_what_is_not_an_image(tmp_path: Path) -> None:
    assert "cannot read image" in error_line("show", str(tmp_path / "missing.img"))
    assert "is not a regular file" in error_line("show", str(tmp_path))
    (tmp_path / "garbage.img").write_bytes(bytes(range(256)) * 3)
    assert f"{tmp_path / 'garbage.img'}: " in error_line("show", str(tmp_path / "garbage.img"))
    assert "not a sockrepair connection image" in error_line("show", str(tmp_path / "garbage.img"))
    (tmp_path / "empty.img").write_bytes(b"")
    assert "truncated" in error_line("show", str(tmp_path / "empty.img"))


def test_with_json_an_error_is_also_a_json_object_on_stdout(tmp_path: Path) -> None:
    (tmp_path / "garbage.img").write_bytes(b"\x00" * 64)
    code, out, err = run_main("show", "--json", str(tmp_path / "garbage.img"))
    assert code == 1 and err.startswith("sockrepair: error: ") and err.count("\n") == 1
    shown = json.loads(out)["error"]
    assert shown["type"] == "ImageError" and shown["path"] == str(tmp_path / "garbage.img")
    assert shown["message"] == err.removeprefix("sockrepair: error: ").rstrip("\n")
    code, out, _ = run_main("verify", str(tmp_path / "none.pcap"), "--tuple", TUPLE, "--json")
    assert code == 1 and "error" in json.loads(out)


def test_error_objects_carry_the_fields_callers_branch_on() -> None:
    conn = ConnTuple.parse(TUPLE)
    exc = SocketStateError("fd 5 is LISTEN", fd=5, pid=42, tuple=conn, tcp_state=10)
    assert error_object(exc) == {"error": {"type": "SocketStateError", "message": "fd 5 is LISTEN", "fd": 5,
                                           "pid": 42, "tuple": TUPLE, "tcp_state": 10}}
    call = error_object(SocketCallError(errno.EPERM, "setsockopt(TCP_REPAIR)", fd=3))["error"]
    assert (call["errno"], call["op"], call["fd"]) == (errno.EPERM, "setsockopt(TCP_REPAIR)", 3)
    image = error_object(ImageError("bad", path="x.img", offset=16, field="window.snd_wnd"))["error"]
    assert (image["path"], image["offset"], image["field"]) == ("x.img", 16, "window.snd_wnd")
    plain = error_object(FileNotFoundError(errno.ENOENT, "No such file or directory", "gone"))["error"]
    assert (plain["type"], plain["errno"], plain["path"]) == ("FileNotFoundError", errno.ENOENT, "gone")


def test_show_prints_the_shared_text_view_and_the_json_view(tmp_path: Path) -> None:
    state = a_state(nodelay=True, sndbuf=4096)
    (tmp_path / "conn-0.img").write_bytes(state.to_bytes())
    code, out, err = run_main("show", str(tmp_path / "conn-0.img"))
    assert code == 0 and err == ""
    assert out.splitlines()[1:] == state_lines(state)
    code, out, _ = run_main("show", str(tmp_path / "conn-0.img"), "--json", "--payload")
    assert code == 0 and json.loads(out) == state.to_dict(payload=True)


def test_the_text_view_of_a_state() -> None:
    lines = state_lines(a_state(nodelay=True, sndbuf=4096), "fd 3    ")
    assert re.fullmatch(r"fd 3    10\.0\.0\.1:5000->10\.0\.0\.2:6000 +ESTABLISHED", lines[0])
    assert lines[1].split() == ["snd_seq", "1000", "rcv_seq", "2000", "unacked", "4", "B", "never", "sent", "2",
                                "B", "unread", "3", "B"]
    assert lines[2].split() == ["mss", "1448", "wscale", "7,6", "sack", "on", "timestamps", "off", "ts", "123456"]
    assert lines[3].split()[:3] == ["window", "snd_wnd", "64000"]
    assert lines[4].split() == ["sockopts", "nodelay", "on", "sndbuf", "4096"]
    plain = state_lines(a_state(window=False))
    assert len(plain) == 4 and not any("window" in line for line in plain)
    assert plain[-1].split() == ["sockopts", "as", "a", "new", "socket's"]


def test_the_text_and_json_views_of_a_closed_connection(tmp_path: Path) -> None:
    state = a_state(window=False).replace(tcp_state=7, send_queue=b"", unsent_len=0, sk_err=32, fin_received=True)
    lines = state_lines(state)
    assert lines[0].split()[-1] == "CLOSE"
    assert lines[-1].split() == ["closed:", "pending", "error", "EPIPE,", "the", "peer's", "FIN", "received"]
    assert state_lines(state.replace(sk_err=0, fin_received=False))[-1].split()[:4] == ["closed:", "pending",
                                                                                         "error", "none,"]
    (tmp_path / "conn-0.img").write_bytes(state.to_bytes())
    code, out, _ = run_main("show", str(tmp_path / "conn-0.img"), "--json")
    assert code == 0 and json.loads(out)["close"] == {"sk_err": 32, "error": "EPIPE", "fin_received": True}
    assert "close" not in a_state().to_dict()


def test_criu_show_prints_the_same_text_view() -> None:
    from sockrepair.criu.images import load_connections

    code, out, _ = run_main("criu", "show", str(DATA / "dump-2pairs"))
    assert code == 0
    for state in load_connections(DATA / "dump-2pairs"):
        assert "\n".join(state_lines(state, "  ")) in out


def test_verify_of_what_is_not_a_capture(tmp_path: Path) -> None:
    assert "no capture file" in error_line("verify", str(tmp_path / "missing.pcap"), "--tuple", TUPLE)
    (tmp_path / "garbage.pcap").write_bytes(b"not a capture at all" * 10)
    assert "cannot read capture" in error_line("verify", str(tmp_path / "garbage.pcap"), "--tuple", TUPLE)
    (tmp_path / "empty.pcap").write_bytes(b"")
    error_line("verify", str(tmp_path / "empty.pcap"), "--tuple", TUPLE)
    error_line("verify", str(tmp_path), "--tuple", TUPLE)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("verify", "x.pcap", "--tuple", "127.0.0.1:5000-127.0.0.1:6000"), "argument --tuple"),
        (("verify", "x.pcap", "--tuple", "127.0.0.1:0->127.0.0.1:6000"), "out of range"),
        (("verify", "x.pcap", "--tuple", "[::1]:1->127.0.0.1:2"), "mixed address families"),
        (("verify", "x.pcap"), "--tuple"),
        (("lock", TUPLE, "--ttl", "0"), "ttl must be in"),
        (("lock", TUPLE, "--ttl", "nan"), "ttl must be in"),
        (("lock", TUPLE, "--ttl", "soon"), "not a number of seconds"),
        (("dump", "--pid", "1", "-D", "d", "--ttl", "-5"), "ttl must be in"),
        (("dump", "--pid", "x", "-D", "d"), "argument --pid"),
        (("dump", "--pid", "1", "-D", "d", "--fd", "three"), "not an fd number"),
        (("demo", "--seconds", "-1"), "want a number of seconds in (0, 86400]"),
        (("demo", "--seconds", "nan"), "want a number of seconds in (0, 86400]"),
        (("demo", "--seconds", "1e308"), "want a number of seconds in (0, 86400]"),
        (("criu", "dump", "--pid", "1", "-D", "d", "--ttl", "7200"), "ttl must be in"),
        (("restore", "-D", "d"), "--exec"),
        (("bench", "--parts", "lock,nope"), "unknown part(s) nope"),
        (("nosuch",), "invalid choice"),
        ((), "required"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: tuple[str, ...], says: str) -> None:
    assert says in usage_error(*argv)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        ((), "sockrepair: error: the following arguments are required: COMMAND"),
        (("restore", "--netns", "b", "--exec", "true"),
         "sockrepair restore: error: one of the arguments -D/--dir --from-criu --pending is required"),
        (("restore", "-D", "d"), "sockrepair restore: error: one of the arguments --exec --unix is required"),
        (("criu", "dump", "--pid", "x", "-D", "d"),
         "sockrepair criu dump: error: argument --pid: invalid int value: 'x'"),
        (("lock",), "sockrepair lock: error: the following arguments are required: TUPLE"),
        (("check", "extra"), "sockrepair: error: unrecognized arguments: extra"),
    ],
)
def test_a_usage_error_is_one_line_without_the_usage_block(argv: tuple[str, ...], line: str) -> None:
    """Every parser of the command, a subcommand's and a subcommand's subcommand's too, printed its whole usage
    block before the error."""
    assert usage_error(*argv) == line + "\n"


def test_help_still_prints_the_usage() -> None:
    code, out, err = run_main("restore", "--help")
    assert (code, err) == (0, "") and out.startswith("usage: sockrepair restore ")


def test_long_input_is_not_echoed_whole_in_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / ("a" * 5000))
    line = error_line("show", path)
    assert line == (f"sockrepair: error: cannot read image {path[:100]!r}... ({len(path)} characters): "
                    "File name too long\n")
    code, out, _ = run_main("show", path, "--json")
    assert code == 1 and json.loads(out)["error"]["path"] == path  # the JSON object keeps it whole
    ttl = "9" * 5000
    assert usage_error("lock", TUPLE, "--ttl", ttl) == (
        f"sockrepair lock: error: argument --ttl: ttl must be in (0, 3600] seconds, not {ttl[:100]!r}... (5000 "
        "characters)\n")
    netns = "n" * 300  # an argument the error quotes inside a longer text (a path)
    assert error_line("restore", "-D", str(tmp_path), "--netns", netns, "--exec", "true") == \
        f"sockrepair: error: {'/run/netns/' + netns[:89]!r}... (311 characters): File name too long\n"
    choice = "x" * 300
    assert f"invalid choice: {choice[:100]!r}... (300 characters) (choose from " in usage_error(choice)
    assert usage_error("check", choice) == (
        f"sockrepair: error: unrecognized arguments: {choice[:100]!r}... (300 characters)\n")


def test_bad_input_to_the_other_commands(tmp_path: Path) -> None:
    assert "TUPLE... or --all" in error_line("unlock")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert f"no such process: {gone.pid}" in error_line("inspect", "--pid", str(gone.pid))
    error_line("restore", "-D", str(tmp_path / "missing"), "--unix", str(tmp_path / "sock"))
    assert "not a directory" in error_line("restore", "--from-criu", str(tmp_path / "missing"), "--unix", "x")
    assert "not a directory" in error_line("criu", "show", str(tmp_path / "missing"))
    assert "no files.img" in error_line("criu", "show", str(tmp_path))
    error_line("criu", "explain", str(tmp_path / "missing.log"))


def test_bench_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    # A fresh interpreter: in this one the benchmark modules are imported already, with matplotlib. Not being root
    # keeps the benchmarks from running should the import succeed after all.
    script = ("import os, sys; sys.modules['matplotlib'] = None  # import matplotlib raises ModuleNotFoundError\n"
              "os.geteuid = lambda: 1000\n"
              "from sockrepair.cli.main import main\n"
              f"sys.exit(main(['bench', '--parts', 'gap', '--out', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr.startswith("sockrepair: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "matplotlib" in done.stderr and "pip install 'sockrepair[bench]'" in done.stderr


def test_the_library_never_imports_the_cli() -> None:
    for path in PACKAGE.rglob("*.py"):
        if PACKAGE / "cli" in path.parents:
            continue
        text = path.read_text()
        assert not re.search(r"sockrepair\.cli\b|from sockrepair import cli\b", text), path


def test_every_json_output_goes_through_one_printer() -> None:
    for path in (PACKAGE / "cli").glob("*.py"):
        if path.name != "output.py":
            assert "json.dump" not in path.read_text(), path


def test_an_injected_fault_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOCKREPAIR_FAULT", "restore:load:raise")
    assert error_line("restore", "-D", str(tmp_path), "--exec", "true") == \
        "sockrepair: error: fault injected at restore load\n"


def test_file_errors_say_the_path_and_the_reason_without_errno(tmp_path: Path) -> None:
    assert error_line("criu", "explain", str(tmp_path / "missing.log")) == \
        f"sockrepair: error: {tmp_path / 'missing.log'}: No such file or directory\n"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = error_line("verify", str(fifo), "--tuple", TUPLE)
    assert line == f"sockrepair: error: cannot read capture {fifo}: is not a regular file\n"
    assert "Errno" not in error_line("show", str(fifo))
    assert "an empty path names no file" in usage_error("show", "")
    assert "an empty path names no file" in usage_error("restore", "-D", "", "--exec", "true")


def test_criu_explain_of_something_not_criu_is_an_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(bytes(range(256)) * 4)
    assert "found nothing criu writes in" in error_line("criu", "explain", str(garbage))
    empty = tmp_path / "nologs"
    empty.mkdir()
    assert "found nothing criu writes in" in error_line("criu", "explain", str(empty))
    # a criu log with nothing wrong in it is still fine
    (empty / "dump.log").write_text("(00.000000) Dumping finished successfully\n")
    assert run_main("criu", "explain", str(empty))[:2] == (0, "no error lines in these logs\n")


def test_criu_dump_of_sockrepair_or_an_ancestor_is_refused_before_criu_runs(tmp_path: Path) -> None:
    me = error_line("criu", "dump", "--pid", str(os.getpid()), "-D", str(tmp_path / "d"))
    assert f"process {os.getpid()} is sockrepair itself: criu would dump sockrepair" in me
    parent = error_line("criu", "dump", "--pid", str(os.getppid()), "-D", str(tmp_path / "d"))
    assert f"process {os.getppid()} is an ancestor of sockrepair" in parent
    assert not (tmp_path / "d").exists()


def test_criu_compare_of_sockrepair_or_an_ancestor_is_refused_before_criu_runs() -> None:
    """criu compare dumps the tree --leave-running: of an ancestor (a shell's `$$`) criu failed, with one
    'unexplained' line per log error and no word of why."""
    me = error_line("criu", "compare", "--pid", str(os.getpid()))
    assert f"process {os.getpid()} is sockrepair itself: criu would dump sockrepair in its tree" in me
    parent = error_line("criu", "compare", "--pid", str(os.getppid()))
    assert f"process {os.getppid()} is an ancestor of sockrepair" in parent


def test_restore_pending_lists_the_journals_of_moves_stopped_half_way(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sockrepair.move import journal

    monkeypatch.setattr(journal, "_parents", lambda: (tmp_path / "run", tmp_path / "tmp"))
    assert run_main("restore", "--pending")[:2] == (
        0, "no move stopped half-way: no pending journal in /run/sockrepair or the temporary directory\n")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = a_state()
    stopped = journal.new_directory(gone.pid)
    assert stopped.parent == tmp_path / "run" and stopped.name.startswith(f"move-{gone.pid}-")
    journal.write_journal(stopped, gone.pid, [7], [state.to_bytes()], [state.tuple], ttl=60, netns=None)
    journal.mark_ended(stopped)
    undone = journal.new_directory(gone.pid)
    journal.write_journal(undone, gone.pid, [7], [state.to_bytes()], [state.tuple], ttl=60, netns=None)
    finished = journal.new_directory(gone.pid)
    journal.write_journal(finished, gone.pid, [7], [state.to_bytes()], [state.tuple], ttl=60, netns=None)
    journal.mark_completed(finished, created=False)
    code, out, _ = run_main("restore", "--pending")
    lines = sorted(out.splitlines())
    assert code == 0 and len(lines) == 2, out
    assert any(re.fullmatch(rf"{stopped}: 1 connection\(s\) of process {gone.pid}, locked for \d+ s more: "
                             rf"`sockrepair restore -D {stopped} --unix PATH` \(or --exec CMD\)", line)
               for line in lines), out
    assert f"{undone}: 1 connection(s) of process {gone.pid}: not restorable: the move was undone" in out
    code, out, _ = run_main("restore", "--pending", "--json")
    listed = {p["directory"]: p for p in json.loads(out)}
    assert listed[str(stopped)]["stale"] is None and listed[str(stopped)]["pid"] == gone.pid
    assert set(listed) == {str(stopped), str(undone)}
    held = journal.hold_directory(stopped)
    try:
        assert "a move in progress" in run_main("restore", "--pending")[1]
    finally:
        os.close(held)
    assert "--pending lists journals: it takes no --exec (options of a restore)" in usage_error(
        "restore", "--pending", "--exec", "true")
    # before: --netns and --force were ignored without a word
    assert "it takes no --netns, --force (options of a restore)" in usage_error(
        "restore", "--pending", "--netns", "elsewhere", "--force")
    assert "one of the arguments --exec --unix is required" in usage_error("restore", "-D", "d")


def test_restore_exec_without_a_program_is_a_usage_error() -> None:
    """`--exec` last on the line: a usage error naming what is missing (before: "--exec: no such program (none
    given) (or not executable)", exit 1, as if a program had been named)."""
    assert usage_error("restore", "-D", "d", "--exec") == \
        "sockrepair restore: error: argument --exec: expected CMD [ARGS...] after it\n"


def test_restore_reports_a_bad_netns_or_exec_before_the_state_of_the_directory(tmp_path: Path) -> None:
    """A completed move's directory was refused first: the typo, the real mistake, was never mentioned."""
    from sockrepair.move import journal

    state = a_state()
    done = tmp_path / "done"
    done.mkdir(mode=0o700)
    journal.write_journal(done, os.getpid(), [7], [state.to_bytes()], [state.tuple], ttl=60, netns=None)
    journal.mark_completed(done, created=False)
    assert error_line("restore", "-D", str(done), "--exec", "true") == \
        f"sockrepair: error: {done}: not restoring stale images: this move completed: its connections live on " \
        "elsewhere\n"
    assert error_line("restore", "-D", str(done), "--netns", "no-such-ns-h4", "--exec", "true") == \
        "sockrepair: error: no network namespace at /run/netns/no-such-ns-h4 (see `ip netns list`)\n"
    missing = str(tmp_path / "no-such-program")
    assert error_line("restore", "-D", str(done), "--exec", missing) == \
        f"sockrepair: error: --exec: no such program {missing} (or not executable)\n"
    assert error_line("restore", "-D", str(done), "--unix-uid", "0", "--exec", "true") == \
        "sockrepair: error: --unix-uid goes with --unix\n"


def test_restore_pending_lists_a_journal_of_another_version_or_shape_as_not_restorable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """journal.json of an unknown version, or not an object, is never offered to `restore -D` (which refuses it):
    it was listed as restorable, or with a Python AttributeError's text, and 'of process None'."""
    from sockrepair.move import journal

    monkeypatch.setattr(journal, "_parents", lambda: (tmp_path / "run", tmp_path / "tmp"))
    for name, text in [("move-1-future", '{"version": 99}'), ("move-2-list", "[1, 2, 3]"),
                       ("move-3-conns", json.dumps({"version": journal.JOURNAL_VERSION, "connections": 5}))]:
        (tmp_path / "run" / name).mkdir(parents=True, mode=0o700)
        (tmp_path / "run" / name / journal.JOURNAL_INDEX).write_text(text)
    code, out, _ = run_main("restore", "--pending")
    run = tmp_path / "run"
    assert code == 0 and sorted(out.splitlines()) == [
        f"{run}/move-1-future: 0 connection(s): not restorable: unreadable: {run}/move-1-future/journal.json: "
        "unsupported journal version",
        f"{run}/move-2-list: 0 connection(s): not restorable: unreadable: {run}/move-2-list/journal.json: "
        "unsupported journal version",
        f"{run}/move-3-conns: 0 connection(s): not restorable: unreadable: {run}/move-3-conns/journal.json: "
        "connections is not a list"]


def test_bench_with_an_out_that_cannot_be_a_directory_fails_before_measuring(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench --out /dev/zero` ran every benchmark (minutes) and then failed writing the report."""
    from sockrepair.bench import run_all

    def measured(*_: object) -> None:
        raise AssertionError("the benchmarks ran")

    monkeypatch.setattr(run_all, "run", measured)
    assert "sockrepair: error: " in error_line("bench", "--quick", "--out", "/dev/zero")
    (tmp_path / "file").write_text("")
    assert str(tmp_path / "file" / "out") in error_line("bench", "--quick", "--out", str(tmp_path / "file" / "out"))


def test_a_ctrl_c_while_the_command_loads_is_one_line_and_exit_130() -> None:
    """The console script's entry point, interrupted while it imports the CLI (a SIGINT sent as the import of
    sockrepair.cli.main begins): one line, exit 130, as for a command interrupted (it printed an import
    traceback)."""
    code = ("import importlib.abc, os, signal, sys\n"
            "class Interrupt(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'sockrepair.cli.main':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from sockrepair.cli import main\n"
            "sys.exit(main(['check', '--json']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "sockrepair: interrupted\n")
