"""The `criu` command group and `restore --from-criu` without running criu: parsing, `criu show` and `criu explain`
on recorded images and logs, the driver's refusals, and how a criu without `--network-lock skip` is detected."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import stat
import sys
from pathlib import Path

import pytest

from sockrepair.cli.criu import add_criu_commands
from sockrepair.cli.main import build_parser
from sockrepair.criu import driver
from sockrepair.criu.images import load_connections
from sockrepair.criu.locate import Criu
from sockrepair.criu.manifest import Manifest, TreeRecord
from sockrepair.criu.show import load_states
from sockrepair.errors import CriuError, ImageError
from tests.clihelp import run_group

DATA = Path(__file__).resolve().parent.parent / "data" / "criu"


def run(*argv: str) -> tuple[int, str]:
    return run_group(add_criu_commands, "criu", *argv)


def parse_error(*argv: str) -> str:
    parser = argparse.ArgumentParser(prog="sockrepair")
    add_criu_commands(parser.add_subparsers(dest="command", required=True))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        parser.parse_args(["criu", *argv])
    return err.getvalue()


def test_subcommands_and_their_required_arguments() -> None:
    assert "--pid" in parse_error("dump", "-D", "x")
    assert "-D/--dir" in parse_error("dump", "--pid", "1")
    assert "ttl must be in (0, 3600]" in parse_error("dump", "--pid", "1", "-D", "x", "--ttl", "0")
    assert "-D/--dir" in parse_error("restore")
    assert "--pid" in parse_error("compare")
    assert "invalid choice" in parse_error("undump")


def test_show_prints_a_plain_criu_image_directory() -> None:
    code, text = run("show", str(DATA / "dump-2pairs"))
    assert code == 0
    states = load_connections(DATA / "dump-2pairs")
    assert text.startswith(f"{DATA / 'dump-2pairs'}: 4 connection(s)")
    assert all(str(s.tuple) in text for s in states) and text.count("unread 3000 B") == 4
    code, text = run("show", str(DATA / "dump-2pairs"), "--json")
    shown = json.loads(text)
    assert shown["dump"] is None and shown["trees"][0]["root"] is None
    assert shown["trees"][0]["connections"] == [s.to_dict() for s in states]


def test_show_and_load_read_a_sockrepair_dump_directory(tmp_path: Path) -> None:
    shutil.copytree(DATA / "dump-2pairs", tmp_path / "tree-42")
    (tmp_path / "tree-43").mkdir()
    Manifest("4.2.1", "skip", 600.0, 1, [TreeRecord(42, "tree-42", [42], [0], "holder", False, True),
                                        TreeRecord(43, "tree-43", [43], [0], "never", False)], []).save(tmp_path)
    assert load_states(tmp_path) == load_connections(DATA / "dump-2pairs")
    code, text = run("show", str(tmp_path))
    assert "sockrepair criu dump of 2 tree(s) by criu 4.2.1" in text
    assert "tree 42 (holder), tree-42: 4 connection(s), not restored yet" in text and "tree 43" not in text
    shown = json.loads(run("show", str(tmp_path), "--json", "--payload")[1])
    assert shown["dump"]["network_lock"] == "skip"
    assert all("base64" in c["recv_queue"] for c in shown["trees"][0]["connections"])


def test_show_refuses_what_is_not_criu_images(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no files.img"):
        run("show", str(tmp_path))
    with pytest.raises(ImageError, match="not a directory"):
        run("show", str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("sample", "keys"),
    [("seed-loopback", ["rlimit-nofile", "iptables-bad-rule", "iptables-config-failed"]),
     ("fork-exists", ["rlimit-nofile", "fork-exists"]), ("tcp-established", None)],
)
def test_explain_names_each_recorded_failure(sample: str, keys: list[str] | None) -> None:
    code, text = run("explain", str(DATA / sample), "--json")
    found = [f["key"] for f in json.loads(text)["findings"]]
    assert code == 1
    if keys is not None:
        assert found == keys
    else:
        assert "tcp-established" in found
    code, text = run("explain", str(DATA / "seed-loopback" / "client.out"))
    assert code == 1 and "the restored connection was reset" in text and "fix:" in text


def test_explain_of_clean_logs_exits_zero(tmp_path: Path) -> None:
    (tmp_path / "dump.log").write_text("(00.000000) Dumping finished successfully\n")
    assert run("explain", str(tmp_path)) == (0, "no error lines in these logs\n")


def test_restore_takes_either_a_sockrepair_dir_or_criu_images() -> None:
    parser = build_parser()
    args = parser.parse_args(["restore", "--from-criu", "imgs", "--unix", "/tmp/x"])
    assert args.from_criu == Path("imgs") and args.dir is None
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        parser.parse_args(["restore", "--from-criu", "imgs", "-D", "d", "--unix", "/tmp/x"])
    assert "not allowed with argument" in err.getvalue()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        parser.parse_args(["restore", "--unix", "/tmp/x"])


def test_restore_refuses_trees_it_cannot_restore(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a directory written by `sockrepair criu dump`"):
        driver.restore(tmp_path)
    Manifest("4.2.1", "skip", 600.0, 1, [TreeRecord(42, "tree-42", [42], [0], "a", False, True, True),
                                        TreeRecord(43, "tree-43", [43], [0], "b", False)], []).save(tmp_path)
    with pytest.raises(CriuError, match=r"tree 43 \(b\) was never dumped"):
        driver.restore(tmp_path)
    with pytest.raises(CriuError, match=r"tree 42 \(a\) is already restored"):
        driver.restore(tmp_path, [42])
    with pytest.raises(CriuError, match=r"tree 43 \(b\) was never dumped"):
        driver.restore(tmp_path, [43])
    with pytest.raises(ImageError, match="no tree with root 44"):
        driver.restore(tmp_path, [44])
    with pytest.raises(CriuError, match="ttl must be"):
        driver.restore(tmp_path, ttl=0)
    Manifest("4.2.1", "skip", 600.0, 1, [TreeRecord(42, "tree-42", [42], [0], "a", False, True, True)],
             []).save(tmp_path)
    with pytest.raises(CriuError, match="every tree of this dump is already restored"):
        driver.restore(tmp_path)


def fake_criu(tmp_path: Path, accepts_skip: bool) -> Criu:
    script = tmp_path / "criu.py"
    script.write_text(
        "import sys\n"
        f"if sys.argv[1:3] == ['--network-lock', 'skip'] and not {accepts_skip}:\n"
        "    print('Error (criu/config.c:1044): Invalid value for --network-lock: skip', file=sys.stderr)\n"
        "    sys.exit(1)\n"
        "print('Version: 4.2.1')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return Criu((sys.executable, str(script)), "test", "4.2.1")


def test_network_lock_skip_is_detected_by_trying_it(tmp_path: Path) -> None:
    assert fake_criu(tmp_path, True).supports_network_lock_skip()
    assert not fake_criu(tmp_path, False).supports_network_lock_skip()
