"""`sockrepair criu setup` without the network: reading the machine's apt sources, choosing the Debian suite, the
private apt state, the wrapper it writes, keeping a working criu, and its one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sockrepair.cli.main import main
from sockrepair.criu import locate, setup
from sockrepair.errors import CriuError
from tests.unit.test_criu_locate import fake_criu

DEB822 = """\
Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
# a comment
URIs: http://mirror.example/debian http://other.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/example.gpg
"""


def test_deb822_main_archive_is_chosen_over_security(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822)
    assert setup.debian_mirror((sources,)) == ("http://mirror.example/debian", "/usr/share/keyrings/example.gpg")


def test_one_line_sources_list(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text(
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
    )
    assert setup.debian_mirror((tmp_path / "absent.sources", sources)) == ("http://mirror.example/debian", "/k.gpg")


def test_no_debian_archive_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CriuError, match="no Debian archive found.*SOCKREPAIR_CRIU"):
        setup.debian_mirror((tmp_path / "absent",))


MADISON = """\
      criu |    4.2.1-1 | http://mirror.example/debian testing/main amd64 Packages
      criu |    4.2.1-1 | http://mirror.example/debian unstable/main amd64 Packages
      criu |    4.1.1-1 | http://mirror.example/debian trixie/main amd64 Packages
"""


def test_the_most_stable_suite_with_criu_42_wins(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    apt = setup.PrivateApt(tmp_path, "http://mirror.example/debian", "/k.gpg")
    monkeypatch.setattr(apt, "call", lambda *args, **kw: MADISON)
    assert apt.choose_suite() == ("testing", "4.2.1-1")
    monkeypatch.setattr(apt, "call", lambda *args, **kw: MADISON.splitlines()[2])
    with pytest.raises(CriuError, match="no Debian suite offers criu >= 4.2"):
        apt.choose_suite()
    sources = (tmp_path / "sources.list").read_text()
    assert "deb [signed-by=/k.gpg] http://mirror.example/debian trixie main" in sources


def test_private_apt_never_points_at_the_system_state(tmp_path: Path) -> None:
    opts = setup.PrivateApt(tmp_path, "http://mirror.example/debian", "/k.gpg").options()
    values = dict(o.split("=", 1) for o in opts[1::2])
    for key in ("Dir::Etc::sourcelist", "Dir::Etc::sourceparts", "Dir::State::Lists", "Dir::State::status",
                "Dir::Cache"):
        assert values[key].startswith(str(tmp_path)), key


def fake_root(prefix: Path, version: str) -> None:
    """An unpacked Debian root as `fetch` leaves it: a loader that runs the program it is given, and criu."""
    lib = prefix / "root" / "usr" / "lib" / "x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libc.so.6").write_text("")
    loader = lib / "ld-linux-x86-64.so.2"
    # `LOADER --library-path DIRS PROGRAM ARGS...`, as ld.so takes it.
    loader.write_text('#!/bin/sh\n[ "$1" = --library-path ] || exit 99\nshift 2\nexec "$@"\n')
    loader.chmod(0o755)
    (prefix / "root" / "usr" / "lib64").mkdir()
    (prefix / "root" / "usr" / "lib64" / "ld-linux-x86-64.so.2").symlink_to(loader)
    sbin = prefix / "root" / "usr" / "sbin"
    sbin.mkdir(parents=True)
    fake_criu(sbin, version)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Root, kernel 6.18, no criu on PATH (only the tools the wrapper uses), no $SOCKREPAIR_CRIU; the per-machine
    prefix (empty) is returned."""
    prefix = tmp_path / "machine"
    monkeypatch.setenv(locate.PREFIX_VAR, str(prefix))
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "readlink"):
        found = shutil.which(tool)
        assert found is not None
        (tools / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.setattr(locate.os, "geteuid", lambda: 0)
    monkeypatch.setattr(locate, "kernel_version", lambda: (6, 18, 0))
    return prefix


def test_the_wrapper_runs_criu_through_the_roots_loader_from_anywhere(machine: Path, tmp_path: Path) -> None:
    fake_root(machine, "4.2.1")
    wrapper = setup.write_wrapper(machine)
    assert wrapper == locate.installed_wrapper() and wrapper.stat().st_mode & 0o777 == 0o755
    text = wrapper.read_text()
    assert '"$P/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$P/usr/lib/x86_64-linux-gnu"' in text
    assert str(tmp_path) not in text  # relative to the wrapper: the prefix may move
    found = locate.find_criu()
    assert (found.origin, found.version) == (locate.ORIGIN_MACHINE, "4.2.1") and found.check().ok
    moved = tmp_path / "moved"
    machine.rename(moved)
    (tmp_path / "link").symlink_to(moved / "bin" / "criu")
    assert locate.probe("test", str(tmp_path / "link")).version == "4.2.1"  # type: ignore[union-attr]


def test_a_root_without_a_loader_is_an_error(machine: Path) -> None:
    (machine / "root").mkdir(parents=True)
    with pytest.raises(CriuError, match="no dynamic loader"):
        setup.write_wrapper(machine)


def test_a_working_criu_is_kept(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_root(machine, "4.2.1")
    setup.write_wrapper(machine)
    monkeypatch.setattr(setup, "fetch", lambda *a: pytest.fail("fetched although a working criu is there"))
    result = setup.setup()
    assert not result.fetched and result.criu.origin == locate.ORIGIN_MACHINE
    assert result.passed_over == [] and result.warnings == []


def test_an_old_criu_is_passed_over_and_one_fetched(machine: Path, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    (tmp_path / "path").mkdir()
    monkeypatch.setenv("PATH", f"{fake_criu(tmp_path / 'path', '4.1.1').parent}:{tmp_path / 'tools'}")
    (tmp_path / "env").mkdir()
    monkeypatch.setenv(locate.ENV_VAR, str(fake_criu(tmp_path / "env", "3.17.1")))
    fetched_into = []

    def fetch(prefix: Path, progress: object) -> Path:
        fetched_into.append(prefix)
        fake_root(prefix, "4.2.1")
        return setup.write_wrapper(prefix)

    monkeypatch.setattr(setup, "fetch", fetch)
    lines: list[str] = []
    result = setup.setup(progress=lines.append)
    assert fetched_into == [machine] and result.fetched
    assert (result.criu.origin, result.criu.version) == (locate.ORIGIN_MACHINE, "4.2.1")
    assert len(result.passed_over) == 2 and lines == result.passed_over
    assert "3.17.1 from $SOCKREPAIR_CRIU" in lines[0] and "4.1.1 from PATH" in lines[1] and "SO_PASSSEC" in lines[1]
    assert result.warnings == ["sockrepair uses $SOCKREPAIR_CRIU first: unset it to use this one"]
    # The second run keeps what the first one installed (the old PATH criu is still there, and passed over).
    monkeypatch.delenv(locate.ENV_VAR)
    monkeypatch.setattr(setup, "fetch", lambda *a: pytest.fail("fetched twice"))
    again = setup.setup()
    assert not again.fetched and again.criu.path == result.criu.path


def test_force_fetches_anyway(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_root(machine, "4.2.1")
    setup.write_wrapper(machine)
    monkeypatch.setattr(setup, "fetch", lambda prefix, progress: locate.installed_wrapper())
    assert setup.setup(force=True).fetched


def test_a_fetched_criu_that_fails_its_check_is_an_error(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fetch(prefix: Path, progress: object) -> Path:
        fake_root(prefix, "4.1.0")
        return setup.write_wrapper(prefix)

    monkeypatch.setattr(setup, "fetch", fetch)
    with pytest.raises(CriuError, match="the fetched criu 4.1.0 does not work here: .*SO_PASSSEC"):
        setup.setup()


def sockrepair(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_setup_needs_root(machine: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(locate.os, "geteuid", lambda: 1000)
    code, out, err = sockrepair("criu", "setup", capsys=capsys)
    assert code == 1 and err == "sockrepair: error: `sockrepair criu setup` must run as root (`criu check` needs it)\n"


def test_missing_apt_is_one_line(machine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = sockrepair("criu", "setup", capsys=capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("sockrepair: error: `apt-get` not found: fetching criu needs a Debian-based system")


def test_a_failed_download_is_one_line(machine: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "tools"
    for tool in setup.TOOLS:
        script = bin_dir / tool
        script.write_text("#!/bin/sh\necho 'W: some warning' >&2\n"
                          "echo 'E: Failed to fetch http://mirror.example/debian/dists/trixie/InRelease' >&2\n"
                          "exit 100\n")
        script.chmod(0o755)
    monkeypatch.setattr(setup, "debian_mirror", lambda: ("http://mirror.example/debian", "/k.gpg"))
    code, out, err = sockrepair("criu", "setup", capsys=capsys)
    assert code == 1
    assert out.startswith("criu setup: fetching criu >= 4.2 from http://mirror.example/debian")
    assert err == ("sockrepair: error: apt-get update failed: E: Failed to fetch "
                   "http://mirror.example/debian/dists/trixie/InRelease\n")
    assert [p.name for p in machine.iterdir()] == []  # the private apt state went with its temporary directory


def test_the_cli_says_what_it_kept(machine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_root(machine, "4.2.1")
    wrapper = setup.write_wrapper(machine)
    code, out, err = sockrepair("criu", "setup", capsys=capsys)
    assert code == 0 and err == ""
    assert out == f"criu setup: using criu 4.2.1 from per-machine install ({wrapper}); `criu check` passed\n"
