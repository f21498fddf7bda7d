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
    """Nothing in the per-machine place and nothing on PATH: only $SOCKREPAIR_CRIU counts."""
    monkeypatch.setenv(locate.PREFIX_VAR, str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.setattr(locate.os, "geteuid", lambda: 0)
    monkeypatch.setattr(locate, "kernel_version", lambda: (6, 18, 0))
    return monkeypatch


def test_missing_criu_is_a_clear_error(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(CriuError, match="criu not found .*absent/bin/criu.*fix: run `sockrepair criu setup`") as err:
        locate.find_criu()
    assert str(err.value).count("sockrepair criu setup") == 1
    status = locate.criu_status()
    assert status["found"] is False and status["check_ok"] is False
    assert "sockrepair criu setup" in status["fix"]
    # `sockrepair check` prints "reason (fix)": the reason must not carry the fix again.
    assert str(tmp_path / "absent" / "bin" / "criu") in status["reason"]
    assert "sockrepair criu setup" not in status["reason"] and "fix" not in status["reason"]


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


def test_search_order_env_then_machine_install_then_path(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("env", "path"):
        (tmp_path / name).mkdir()
    on_path = fake_criu(tmp_path / "path", "4.2.0")
    only_env.setenv("PATH", str(on_path.parent))
    assert locate.find_criu().origin == "PATH"
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    installed = fake_criu(prefix / "bin", "4.2.1")
    only_env.setenv(locate.PREFIX_VAR, str(prefix))
    assert locate.installed_wrapper() == installed
    found = locate.find_criu()
    assert (found.origin, found.path, found.version) == (locate.ORIGIN_MACHINE, str(installed), "4.2.1")
    assert locate.criu_status()["origin"] == locate.ORIGIN_MACHINE
    only_env.setenv(locate.ENV_VAR, str(fake_criu(tmp_path / "env", "4.3")))
    assert locate.find_criu().version == "4.3"
    assert [origin for origin, _ in locate.candidates()] == ["$SOCKREPAIR_CRIU", locate.ORIGIN_MACHINE, "PATH"]


def test_machine_install_is_not_in_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found the same from a checkout or from a wheel in site-packages: nothing relative to the package."""
    monkeypatch.delenv(locate.PREFIX_VAR, raising=False)
    assert locate.install_prefix() == Path("/var/lib/sockrepair/criu") == locate.DEFAULT_PREFIX
    assert locate.installed_wrapper() == Path("/var/lib/sockrepair/criu/bin/criu")
    package = Path(locate.__file__).resolve().parents[1]
    assert not locate.installed_wrapper().is_relative_to(package.parent)


def test_a_broken_machine_install_falls_through_to_path(only_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    broken = prefix / "bin" / "criu"
    broken.write_text("#!/bin/sh\necho 'cannot open shared object file' >&2\nexit 127\n")
    broken.chmod(0o755)
    only_env.setenv(locate.PREFIX_VAR, str(prefix))
    with pytest.raises(CriuError, match="per-machine install .* does not run: cannot open shared object file"):
        locate.find_criu()
    (tmp_path / "path").mkdir()
    only_env.setenv("PATH", str(fake_criu(tmp_path / "path", "4.2.1").parent))
    assert locate.find_criu().origin == "PATH"


def test_every_failed_candidate_is_named_and_the_fix_given_once(only_env: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "criu").write_text("not executable")
    (tmp_path / "path").mkdir()
    on_path = tmp_path / "path" / "criu"
    on_path.write_text("#!/bin/sh\nexit 3\n")
    on_path.chmod(0o755)
    only_env.setenv(locate.PREFIX_VAR, str(prefix))
    only_env.setenv("PATH", str(on_path.parent))
    with pytest.raises(CriuError) as err:
        locate.find_criu()
    message = str(err.value)
    assert "per-machine install" in message and "is not an executable file" in message
    assert f"PATH ({on_path}) does not run: 3" in message
    assert message.count("fix:") == 1 and message.endswith(locate.SETUP_HINT)
