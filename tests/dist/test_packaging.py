"""The package as a user gets it: `python -m build` makes an sdist and a wheel (the wheel built FROM the sdist, so a
file missing from the sdist breaks it), each installs into a fresh venv, and the installed command runs from outside
the checkout. Needs the package index for build and runtime dependencies, as any user's install does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("construct", "google.protobuf", "scapy")


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{argv[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=out)
    sdists, wheels = list(out.glob("sockrepair-*.tar.gz")), list(out.glob("sockrepair-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


def test_sdist_carries_the_declarations_and_the_c_reference(dists: dict[str, Path]) -> None:
    import tarfile

    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"sockrepair/engine/decl/tcp_repair.h", "sockrepair/engine/decl/socket.h",
            "sockrepair/bench/reference/repair_cycle.c", "sockrepair/py.typed", "setup.py"} <= names
    # generated at build time from the headers, never shipped stale
    assert "sockrepair/engine/_cdefs.py" not in names


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_into_a_fresh_venv_and_runs(kind: str, dists: dict[str, Path], tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(dists[kind])], cwd=tmp_path)
    probe = ("import sys, sockrepair; "
             f"print(sockrepair.__file__); print([m for m in {HEAVY!r} if m in sys.modules])")
    where, heavy = _run([str(py), "-c", probe], cwd=tmp_path).stdout.splitlines()
    assert where.startswith(str(env_dir)), where  # the installed copy, not the checkout
    assert heavy == "[]"
    check = subprocess.run([str(env_dir / "bin" / "sockrepair"), "check", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert "Traceback" not in check.stderr, check.stderr
    report = json.loads(check.stdout)
    assert {"CAP_NET_ADMIN", "TCP_REPAIR", "TCP_REPAIR_WINDOW"} <= {f["name"] for f in report["features"]}
    if os.geteuid() == 0:  # as root on this kernel, repair works from the installed copy as from the checkout
        assert check.returncode == 0 and report["repair_works"] is True, report
    else:
        assert check.returncode == 1 and report["repair_works"] is False, report
