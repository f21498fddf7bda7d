"""scripts/setup_criu.py's pure parts: reading the machine's apt sources and choosing the Debian suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent.parent / "scripts" / "setup_criu.py"


@pytest.fixture(scope="module")
def setup() -> ModuleType:
    spec = importlib.util.spec_from_file_location("setup_criu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_deb822_main_archive_is_chosen_over_security(setup: ModuleType, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822)
    monkeypatch.setattr(setup, "SOURCES_FILES", (sources,))
    assert setup.debian_mirror() == ("http://mirror.example/debian", "/usr/share/keyrings/example.gpg")


def test_one_line_sources_list(setup: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text(
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
    )
    monkeypatch.setattr(setup, "SOURCES_FILES", (tmp_path / "absent.sources", sources))
    assert setup.debian_mirror() == ("http://mirror.example/debian", "/k.gpg")


def test_no_debian_archive_is_a_clear_error(setup: ModuleType, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setup, "SOURCES_FILES", (tmp_path / "absent",))
    with pytest.raises(setup.SetupError, match="no Debian archive found.*SOCKREPAIR_CRIU"):
        setup.debian_mirror()


MADISON = """\
      criu |    4.2.1-1 | http://mirror.example/debian testing/main amd64 Packages
      criu |    4.2.1-1 | http://mirror.example/debian unstable/main amd64 Packages
      criu |    4.1.1-1 | http://mirror.example/debian trixie/main amd64 Packages
"""


def test_the_most_stable_suite_with_criu_42_wins(setup: ModuleType, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    apt = setup.PrivateApt(tmp_path, "http://mirror.example/debian", "/k.gpg")
    monkeypatch.setattr(apt, "call", lambda *args, **kw: MADISON)
    assert apt.choose_suite() == ("testing", "4.2.1-1")
    monkeypatch.setattr(apt, "call", lambda *args, **kw: MADISON.splitlines()[2])
    with pytest.raises(setup.SetupError, match="no Debian suite offers criu >= 4.2"):
        apt.choose_suite()
    sources = (tmp_path / "sources.list").read_text()
    assert "deb [signed-by=/k.gpg] http://mirror.example/debian trixie main" in sources


def test_private_apt_never_points_at_the_system_state(setup: ModuleType, tmp_path: Path) -> None:
    opts = setup.PrivateApt(tmp_path, "http://mirror.example/debian", "/k.gpg").options()
    values = dict(o.split("=", 1) for o in opts[1::2])
    for key in ("Dir::Etc::sourcelist", "Dir::Etc::sourceparts", "Dir::State::Lists", "Dir::State::status",
                "Dir::Cache"):
        assert values[key].startswith(str(tmp_path)), key
