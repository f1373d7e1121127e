"""phase1_foundation/setup_host.sh: reports the GPU, changes clocks and power only when asked.

There is no GPU here, so nvidia-smi is a stand-in script on PATH that answers the one query the script makes
(with a Tesla P4 in an x8 slot) and logs every invocation.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "phase1_foundation" / "setup_host.sh"
# index, name, bus, driver, persistence, PCIe gen cur/max, width cur/max, power draw/limit/default/min/max,
# clocks SM/SM max/memory, temperature, compute mode
P4_ROW = ("0, Tesla P4, 00000000:3B:00.0, 550.54.15, Disabled, 1, 3, 8, 16, "
          "6.50, 75.00, 75.00, 60.00, 75.00, 405, 1531, 405, 34, Default")
FAKE_SMI = f"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_SMI_LOG"
case "$*" in
  *--query-gpu=*) echo "{P4_ROW}" ;;
esac
"""


@pytest.fixture()
def fake_gpu(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "FAKE_SMI_LOG": str(tmp_path / "smi.log")}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60,
                          check=False)


def _smi_calls(env: dict[str, str]) -> list[str]:
    log = Path(env["FAKE_SMI_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def _changing_calls(env: dict[str, str]) -> list[str]:
    return [c for c in _smi_calls(env) if "--query-gpu" not in c]


def test_help_and_bad_arguments() -> None:
    proc = _run(dict(os.environ), "--help")
    assert proc.returncode == 0
    assert "--lock-clocks MIN,MAX" in proc.stdout
    for args in (["--lock-clocks", "fast"], ["--lock-clocks", "1500,1000"], ["--power-limit", "70W"],
                 ["--bogus"], ["--check", "--lock-clocks", "1000,1500"]):
        bad = _run(dict(os.environ), *args)
        assert bad.returncode == 2, args
        assert bad.stderr.startswith("setup_host:"), bad.stderr


def test_no_driver_is_reported_not_crashed(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    if any((Path(d) / "nvidia-smi").exists() for d in env["PATH"].split(":")):
        pytest.skip("this machine has a real nvidia-smi")
    proc = _run(env, "--check")
    assert proc.returncode == 3
    assert "nvidia-smi not found" in proc.stderr


def test_check_reports_pcie_power_and_changes_nothing(fake_gpu: dict[str, str]) -> None:
    proc = _run(fake_gpu, "--check")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "GPU0 Tesla P4" in out
    assert "PCIe link: gen 1 of 3, width x8 of x16" in out
    assert "WARNING: link runs at x8" in out
    assert "limit 75.00 W (default 75.00, range 60.00..75.00)" in out
    assert "persistence mode: Disabled" in out
    assert _changing_calls(fake_gpu) == []


def test_default_run_only_enables_persistence(fake_gpu: dict[str, str]) -> None:
    proc = _run(fake_gpu, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    would = [line.strip() for line in proc.stdout.splitlines() if "would run:" in line]
    assert len(would) == 1
    assert "persistenced" in would[0] or would[0].endswith("nvidia-smi -pm 1")
    assert "clocks: unchanged" in proc.stdout
    assert "power limit: unchanged" in proc.stdout
    assert _changing_calls(fake_gpu) == []


def test_clock_lock_and_power_limit_only_on_request(fake_gpu: dict[str, str]) -> None:
    proc = _run(fake_gpu, "--dry-run", "--gpu", "0", "--lock-clocks", "1000,1500", "--power-limit", "70")
    assert proc.returncode == 0, proc.stderr
    assert "would run: nvidia-smi -i 0 -lgc 1000,1500" in proc.stdout
    assert "would run: nvidia-smi -i 0 -pl 70" in proc.stdout
    assert _changing_calls(fake_gpu) == []

    too_high = _run(fake_gpu, "--dry-run", "--power-limit", "90")
    assert too_high.returncode == 2
    assert "outside its range 60.00..75.00 W" in too_high.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="applying changes needs root")
def test_applies_exactly_the_requested_changes(fake_gpu: dict[str, str]) -> None:
    proc = _run(fake_gpu, "--skip-persistence", "--lock-clocks", "1000,1500", "--power-limit", "70")
    assert proc.returncode == 0, proc.stderr
    assert _changing_calls(fake_gpu) == ["-lgc 1000,1500", "-pl 70"]
    reset = _run(fake_gpu, "--skip-persistence", "--reset-clocks")
    assert reset.returncode == 0, reset.stderr
    assert _changing_calls(fake_gpu)[-1] == "-rgc"
