"""Finding criu and classifying `criu check` results, with stand-in criu executables."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sockrepair.criu import locate
from sockrepair.errors import CriuError

DATA = Path(__file__).resolve().parent.parent / "data" / "criu"


def fake_criu(tmp_path: Path, version: str, check_out: str = "Looks good.", check_rc: int = 0) -> Path:
    out = tmp_path / "check.out"
    out.write_text(check_out + "\n")
    script = tmp_path / "criu"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then echo "Version: {version}"; exit 0; fi\n'
        f'if [ "$1" = check ]; then /bin/cat "{out}" >&2; exit {check_rc}; fi\n'
        "exit 2\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture
def only_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No project prefix and nothing on PATH: only $SOCKREPAIR_CRIU counts."""
    monkeypatch.setattr(locate, "PREFIX_WRAPPER", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.setattr(locate.os, "geteuid", lambda: 0)
    monkeypatch.setattr(locate, "kernel_version", lambda: (6, 18, 0))
    return monkeypatch


def test_missing_criu_is_a_clear_error(only_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(CriuError, match="criu not found.*setup_criu.py"):
        locate.find_criu()
    status = locate.criu_status()
    assert status["found"] is False and status["check_ok"] is False
    assert "setup_criu.py" in status["fix"]


def test_env_pointing_nowhere_is_not_silently_skipped(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    only_env.setenv(locate.ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(CriuError, match=r"\$SOCKREPAIR_CRIU .* is not an executable"):
        locate.find_criu()


def test_working_criu(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    only_env.setenv(locate.ENV_VAR, str(fake_criu(tmp_path, "4.2.1")))
    criu = locate.find_criu()
    assert (criu.origin, criu.version, criu.version_tuple) == ("$SOCKREPAIR_CRIU", "4.2.1", (4, 2, 1))
    result = criu.check()
    assert result.ok and result.reason == "Looks good."
    assert criu.require_working() is criu
    assert locate.criu_status()["check_ok"] is True


def test_vdso_abort_is_classified(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    recorded = (DATA / "vdso" / "check.stderr").read_text().strip()
    only_env.setenv(locate.ENV_VAR, str(fake_criu(tmp_path, "3.17.1", recorded, 1)))
    result = locate.find_criu().check()
    assert not result.ok
    assert "vDSO" in result.reason and "4.2" in result.fix


def test_criu_41_passes_check_but_fails_on_new_kernels(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    only_env.setenv(locate.ENV_VAR, str(fake_criu(tmp_path, "4.1.1")))
    criu = locate.find_criu()
    result = criu.check()
    assert not result.ok and "SO_PASSSEC" in result.reason
    with pytest.raises(CriuError, match="4.1.1 .* not usable.*SO_PASSSEC"):
        criu.require_working()
    only_env.setattr(locate, "kernel_version", lambda: (6, 12, 0))
    assert criu.check().ok


def test_unknown_check_failure_keeps_criu_words(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    only_env.setenv(locate.ENV_VAR, str(fake_criu(tmp_path, "4.2.1", "Something odd happened", 1)))
    result = locate.find_criu().check()
    assert not result.ok and result.reason == "`criu check` failed: Something odd happened"


def test_check_without_root_says_so(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    only_env.setenv(locate.ENV_VAR, str(fake_criu(tmp_path, "4.2.1")))
    only_env.setattr(locate.os, "geteuid", lambda: 1000)
    result = locate.find_criu().check()
    assert not result.ok and "root" in result.reason


def test_search_order_env_then_prefix_then_path(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("env", "prefix", "path"):
        (tmp_path / name).mkdir()
    on_path = fake_criu(tmp_path / "path", "4.2.0")
    only_env.setenv("PATH", str(on_path.parent))
    assert locate.find_criu().origin == "PATH"
    only_env.setattr(locate, "PREFIX_WRAPPER", fake_criu(tmp_path / "prefix", "4.2.1"))
    assert locate.find_criu().origin == "project prefix"
    only_env.setenv(locate.ENV_VAR, str(fake_criu(tmp_path / "env", "4.3")))
    assert locate.find_criu().version == "4.3"
