"""`edgeserve host-setup`: exact nvidia-smi commands from NVML-shaped GPUs, values outside NVML's range
refused with the range, `--apply` runs the printed commands (a stand-in nvidia-smi logs them: no GPU here)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from server.cli import host_setup as host_setup_cli
from server.hardware.gpu_info import GpuInfo
from server.ops.apply import apply_actions
from server.ops.host_setup import HostSetupRequest, plan_host_setup
from server.ops.snapshot import HostSnapshot

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "phase1_foundation" / "setup_host.sh"


def _gpus(machines: dict[str, HostSnapshot], name: str) -> tuple[GpuInfo, ...]:
    return machines[name].detection.gpus


def _commands(machines: dict[str, HostSnapshot], name: str, **request: object) -> list[str]:
    plan = plan_host_setup(_gpus(machines, name), HostSetupRequest(**request))  # type: ignore[arg-type]
    assert not plan.refusals, plan.refusals
    return [a.command for a in plan.actions]


def _refused(machines: dict[str, HostSnapshot], name: str, **request: object) -> str:
    plan = plan_host_setup(_gpus(machines, name), HostSetupRequest(**request))  # type: ignore[arg-type]
    assert plan.actions == ()
    (refusal,) = plan.refusals
    return refusal.detail


def test_by_default_only_persistence_is_turned_on(machines: dict[str, HostSnapshot]) -> None:
    assert _commands(machines, "hot-4090") == ["nvidia-smi -i 0 -pm 1"]
    plan = plan_host_setup(_gpus(machines, "healthy-p4"), HostSetupRequest())
    assert plan.actions == ()
    assert [(f.setting, f.detail) for f in plan.findings] == [("persistence", "already on")]


def test_power_limit_inside_the_range_of_each_card(machines: dict[str, HostSnapshot]) -> None:
    assert _commands(machines, "hot-4090", persistence=False, power_limit_w="max") == [
        "nvidia-smi -i 0 -pl 600"]
    assert _commands(machines, "hot-4090", persistence=False, power_limit_w=300) == [
        "nvidia-smi -i 0 -pl 300"]
    assert _commands(machines, "healthy-p4", power_limit_w="default") == []  # already 75 W
    pair = _commands(machines, "throttled-5090-pair", power_limit_w=500)
    assert pair == ["nvidia-smi -i 0 -pl 500", "nvidia-smi -i 1 -pl 500"]


def test_out_of_range_values_are_refused_with_the_range(machines: dict[str, HostSnapshot]) -> None:
    assert _refused(machines, "healthy-p4", power_limit_w=90) == "90 W is outside GPU 0's range 60..75 W"
    assert "Volta or newer" in _refused(machines, "healthy-p4", persistence=False,
                                        locked_clocks_mhz=(800, 1200))  # the P4 is Pascal
    assert "range ..3105 MHz" in _refused(machines, "hot-4090", persistence=False,
                                          locked_clocks_mhz=(2000, 3500))
    assert "takes no application clocks" in _refused(machines, "hot-4090", persistence=False,
                                                     applications_clocks_mhz=(10501, 2520))
    assert "supported: 455..1531 MHz (4 steps)" in _refused(machines, "healthy-p4",
                                                            applications_clocks_mhz=(3003, 1600))
    assert "memory clock 1000 MHz is not supported; supported: 405, 3003 MHz" in _refused(
        machines, "healthy-p4", applications_clocks_mhz=(1000, 455))
    assert _refused(machines, "healthy-p4", gpus=(3,)) == "no GPU 3 here (GPUs: 0)"


def test_clocks_and_compute_mode_where_supported(machines: dict[str, HostSnapshot]) -> None:
    assert _commands(machines, "healthy-p4", applications_clocks_mhz=(3003, 1531),
                     compute_mode="exclusive_process") == [
        "nvidia-smi -i 0 -ac 3003,1531", "nvidia-smi -i 0 -c EXCLUSIVE_PROCESS"]
    assert _commands(machines, "throttled-5090-pair", gpus=(1,), locked_clocks_mhz=(1500, 2400)) == [
        "nvidia-smi -i 1 -lgc 1500,2400"]
    assert _commands(machines, "healthy-p4", reset_clocks=True) == ["nvidia-smi -i 0 -rac"]
    assert _commands(machines, "throttled-5090-pair", gpus=(0,), reset_clocks=True) == [
        "nvidia-smi -i 0 -rgc"]


def test_contradictory_requests_are_rejected() -> None:
    with pytest.raises(ValueError, match="MIN is above MAX"):
        HostSetupRequest(locked_clocks_mhz=(2000, 1000))
    with pytest.raises(ValueError, match="not both"):
        HostSetupRequest(reset_clocks=True, locked_clocks_mhz=(1000, 2000))


# --- applying, with a stand-in nvidia-smi ---------------------------------------------------------


@pytest.fixture()
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """nvidia-smi on PATH that logs its arguments and fails for `-c` (as a driver that refuses would)."""
    log = tmp_path / "smi.log"
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
                   'case "$*" in *" -c "*) echo "Insufficient Permissions" >&2; exit 4;; esac\n'
                   'echo "All done."\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    return log


def test_apply_runs_the_printed_commands_and_reports_each(machines: dict[str, HostSnapshot],
                                                          fake_smi: Path) -> None:
    plan = plan_host_setup(_gpus(machines, "hot-4090"),
                           HostSetupRequest(power_limit_w=500, compute_mode="exclusive_process"))
    results = apply_actions(plan.actions)
    assert fake_smi.read_text().splitlines() == ["-i 0 -pm 1", "-i 0 -pl 500", "-i 0 -c EXCLUSIVE_PROCESS"]
    assert [r.ok for r in results] == [True, True, False]
    assert results[0].output == "All done."
    assert results[2].returncode == 4 and "Insufficient Permissions" in results[2].output


# --- the command ------------------------------------------------------------------------------------


@pytest.fixture()
def app(command_app: Callable[..., typer.Typer]) -> typer.Typer:
    return command_app(host_setup_cli.register)


def test_the_command_prints_commands_for_a_saved_snapshot(app: typer.Typer,
                                                          snapshot_file: Callable[[str], str]) -> None:
    path = snapshot_file("throttled-5090-pair")
    result = CliRunner().invoke(app, ["host-setup", "--snapshot", path, "--power-limit", "max",
                                         "--lock-clocks", "1500,2400"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for cmd in ("nvidia-smi -i 0 -pl 600", "nvidia-smi -i 1 -pl 600", "nvidia-smi -i 0 -lgc 1500,2400",
                "nvidia-smi -i 1 -lgc 1500,2400"):
        assert cmd in lines
    data = json.loads(CliRunner().invoke(app, ["host-setup", "--snapshot", path, "--json"]).stdout)
    assert data["actions"] == [] and data["applied"] is None


def test_the_command_refuses_and_exits_2(app: typer.Typer, snapshot_file: Callable[[str], str]) -> None:
    result = CliRunner().invoke(app, ["host-setup", "--snapshot", snapshot_file("healthy-p4"),
                                         "--power-limit", "120"])
    assert result.exit_code == 2
    assert "outside GPU 0's range 60..75 W" in result.output
    for bad in (["--power-limit", "70W"], ["--lock-clocks", "fast"], ["--compute-mode", "exclusive_thread"]):
        assert CliRunner().invoke(app, ["host-setup", "--snapshot", snapshot_file("healthy-p4"),
                                           *bad]).exit_code == 2, bad
    applied = CliRunner().invoke(app, ["host-setup", "--snapshot", snapshot_file("healthy-p4"), "--apply"])
    assert applied.exit_code == 2 and "cannot be applied" in applied.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root may apply; the refusal is for other users")
def test_apply_needs_root(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["host-setup", "--apply"])
    assert result.exit_code == 4 and "needs root" in result.output


def test_the_wrapper_on_this_machine() -> None:
    """No GPU here: setup_host.sh (edgeserve host-setup) says so and exits 3; with one it prints commands."""
    proc = subprocess.run([str(WRAPPER), "--json"], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode == 3:
        assert "no NVIDIA GPU here" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert "actions" in json.loads(proc.stdout)
