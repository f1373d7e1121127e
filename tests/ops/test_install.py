"""A non-editable install (`pip install .`) plans and launches with the card table and the card profiles.

Bug: `configs/` was found through `Path(__file__).parents[2]`, so an installed edgeserve (site-packages has no
configs/ beside it) planned every card with default settings. The card table and the profiles are package
data now. To stay fast and offline, the project is installed with --no-deps --no-build-isolation into a fresh
venv that sees the test venv's site-packages through a .pth line (its dependencies and setuptools), but not
the test venv's editable edgeserve (a .pth inside a directory added that way is not processed).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

SOURCES = ("pyproject.toml", "README.md", "server", "quantize", "loadtest")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Path:
    """bin/ of a fresh venv with edgeserve installed from a copy of the sources (no build files in the
    repo)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "src"
    source.mkdir()
    for name in SOURCES:
        path = repo / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = next(venv.glob("lib/python*/site-packages"))
    (purelib / "test_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
        check=True, timeout=600, env=_env(), cwd=tmp,
    )
    where = subprocess.run([str(python), "-c", "import server; print(server.__file__)"], capture_output=True,
                           text=True, check=True, env=_env(), cwd=tmp).stdout
    assert where.startswith(str(purelib)), f"edgeserve imported from {where}, not from the install"
    return venv / "bin"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("EDGESERVE_", "PYTHONPATH"))}


def _edgeserve(bin_dir: Path, *args: str) -> dict[str, object]:
    proc = subprocess.run([str(bin_dir / "edgeserve"), *args], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=bin_dir.parent.parent, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


@pytest.mark.slow
def test_an_installed_edgeserve_plans_with_the_card_table(installed: Path) -> None:
    budget = _edgeserve(installed, "plan", "--card", "tesla-p4", "--ctx", "2048", "--parallel", "2", "--json")
    assert budget["card"] == "tesla-p4" and budget["fits"] is True
    assert budget["n_ctx"] == 2048 and budget["n_ctx_total"] == 4096


@pytest.mark.slow
def test_an_installed_edgeserve_launches_with_the_profiles(installed: Path) -> None:
    plan = _edgeserve(installed, "launch", "--card", "tesla-p4", "--dry-run", "--json")
    sources = {r["setting"]: r["source"] for r in plan["reasons"]}  # type: ignore[union-attr]
    assert plan["kv_type"] == "q8_0" and sources["kv_type"] == "profile"  # the P4 profile's own setting
    assert plan["n_parallel"] == 4 and sources["n_parallel"] == "profile"
    cpu = _edgeserve(installed, "launch", "--card", "cpu", "--dry-run", "--json")
    assert cpu["backend"] == "embedded"
    assert {r["setting"]: r["source"] for r in cpu["reasons"]}["backend"] == "profile"  # type: ignore[union-attr]
