"""`edgeserve doctor`: the checks judge NVML-shaped snapshots of real-looking machines, the command reads and
writes snapshots and exits as scripts expect, and on this machine (no GPU) it checks what still applies."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from server.cli import doctor as doctor_cli
from server.ops.check import Check
from server.ops.doctor import doctor, run_checks
from server.ops.probe import probe_sglang
from server.ops.snapshot import HostSnapshot, PlannedUse, PortState

ROOT = Path(__file__).resolve().parents[2]


def _by_name(checks: tuple[Check, ...]) -> dict[tuple[str, int | None], Check]:
    return {(c.name, c.gpu): c for c in checks}


def _status(snapshot: HostSnapshot) -> dict[tuple[str, int | None], str]:
    return {key: c.status for key, c in _by_name(run_checks(snapshot)).items()}


def test_a_healthy_p4_passes_every_check(machines: dict[str, HostSnapshot]) -> None:
    report = doctor(machines["healthy-p4"])
    assert report.exit_code == 0
    assert report.counts["fail"] == 0 and report.counts["warn"] == 0, report.checks
    status = _status(machines["healthy-p4"])
    for name in ("gpu.utilization", "gpu.temperature", "gpu.memory", "gpu.processes", "gpu.persistence",
                 "gpu.pcie", "gpu.clocks", "gpu.power", "gpu.ecc", "llama_cpp.arch"):
        assert status[(name, 0)] == "pass", name
    # A P4 never runs SGLang: not applicable rather than a failure.
    assert status[("sglang", None)] == "skip"
    checks = _by_name(report.checks)
    assert "kernels for sm_61" in checks[("llama_cpp.arch", 0)].detail
    assert "expects 6.9 GiB" in checks[("gpu.memory", 0)].detail
    assert "lower generation at idle" in checks[("gpu.pcie", 0)].detail


def test_a_hot_busy_4090_fails_on_heat_and_memory(machines: dict[str, HostSnapshot]) -> None:
    report = doctor(machines["hot-4090"])
    assert report.exit_code == 1
    checks = _by_name(report.checks)
    assert checks[("gpu.temperature", 0)].status == "fail" and "88 C" in checks[("gpu.temperature", 0)].detail
    assert checks[("gpu.utilization", 0)].status == "warn"
    assert checks[("gpu.memory", 0)].status == "fail"  # 3 GiB free, the plan wants 20
    assert checks[("gpu.processes", 0)].status == "warn" and "python3 (pid 4242" in checks[
        ("gpu.processes", 0)].detail
    assert checks[("gpu.persistence", 0)].status == "warn"
    assert checks[("gpu.persistence", 0)].hint is not None and "host-setup" in checks[
        ("gpu.persistence", 0)].hint
    assert checks[("gpu.clocks", 0)].status == "fail"  # sw_thermal_slowdown: the card protects itself
    assert checks[("gpu.ecc", 0)].status == "skip"  # GeForce: no ECC memory
    assert checks[("sglang", None)].status == "pass"  # SM89, a CUDA torch
    assert checks[("llama_cpp.arch", 0)].status == "pass"


def test_a_throttled_5090_pair_without_peer_access(machines: dict[str, HostSnapshot]) -> None:
    checks = _by_name(run_checks(machines["throttled-5090-pair"]))
    assert checks[("gpu.pcie", 1)].status == "warn" and "x8 of x16" in checks[("gpu.pcie", 1)].detail
    assert checks[("gpu.pcie", 0)].status == "pass"
    assert checks[("gpu.clocks", 1)].status == "fail" and "hw_slowdown" in checks[("gpu.clocks", 1)].detail
    assert checks[("gpu.clocks", 0)].status == "pass"
    peer = checks[("gpus.peer_access.0-1", None)]
    assert peer.status == "warn" and "not_supported" in peer.detail and "system" in peer.detail
    assert checks[("gpus.nccl", None)].status == "warn"
    assert checks[("sglang", None)].status == "warn"  # SM120 could run it; not installed
    # One architecture, one build question.
    assert [c for c in run_checks(machines["throttled-5090-pair"]) if c.name == "llama_cpp.arch"] == [
        checks[("llama_cpp.arch", 0)]]


def test_a_build_without_gpu_offload_fails_on_a_gpu_host(machines: dict[str, HostSnapshot]) -> None:
    report = doctor(machines["p4-without-offload"])
    assert report.exit_code == 1
    build = _by_name(report.checks)[("llama_cpp.build", None)]
    assert build.status == "fail" and "no GPU offload" in build.detail
    assert build.hint is not None and "-DGGML_CUDA=on" in build.hint


def test_pascal_needs_a_cuda_12_build(machines: dict[str, HostSnapshot]) -> None:
    arch = _by_name(run_checks(machines["p4-with-cuda13"]))[("llama_cpp.arch", 0)]
    assert arch.status == "fail"
    assert ("Pascal (CC 6.x) needs a llama.cpp built with a CUDA 12.x toolkit: CUDA 13 dropped sm_61 and "
            "older (llama.cpp issue 25909)") in arch.detail


def test_a_build_newer_than_the_driver_fails(machines: dict[str, HostSnapshot]) -> None:
    snap = machines["hot-4090"]
    older = snap.detection.model_copy(update={"cuda_version": "12.4"})
    old_driver = snap.model_copy(update={"detection": older})
    check = _by_name(run_checks(old_driver))[("llama_cpp.cuda_driver", None)]
    assert check.status == "fail" and "build CUDA 13.0, driver supports CUDA 12.4" in check.detail


def test_the_cpu_machine_checks_what_applies(machines: dict[str, HostSnapshot]) -> None:
    report = doctor(machines["cpu"])
    assert report.is_cpu_only and report.exit_code == 0
    names = {c.name for c in report.checks}
    assert {"plan", "host.cpus", "host.memory", "host.disk", "host.port.8000", "gpu.driver",
            "llama_cpp.build", "sglang"} <= names
    assert not any(c.gpu is not None for c in report.checks)
    assert _by_name(report.checks)[("gpu.driver", None)].status == "skip"


def test_a_plan_too_big_for_ram_and_a_taken_port_fail(machines: dict[str, HostSnapshot]) -> None:
    snap = machines["cpu"].model_copy(update={
        "plan": PlannedUse(backend="embedded", card="cpu", gpus=0, expected_bytes=500 * 2**30),
        "ports": (PortState(host="127.0.0.1", port=8000, role="gateway", in_use=True),),
    })
    report = doctor(snap)
    checks = _by_name(report.checks)
    assert checks[("host.memory", None)].status == "fail"
    assert checks[("host.port.8000", None)].status == "fail"
    assert report.exit_code == 1


def test_strict_turns_warnings_into_failures(machines: dict[str, HostSnapshot]) -> None:
    pair = machines["throttled-5090-pair"]
    no_fail = pair.model_copy(update={"detection": pair.detection.model_copy(update={
        "gpus": tuple(g.model_copy(update={"clock_reasons": ()}) for g in pair.detection.gpus)})})
    assert doctor(no_fail).exit_code == 0
    assert doctor(no_fail, strict=True).exit_code == 1


# --- the command ------------------------------------------------------------------------------------


@pytest.fixture()
def app(command_app: Callable[..., typer.Typer]) -> typer.Typer:
    return command_app(doctor_cli.register)


@pytest.mark.parametrize(("machine", "code"), [("healthy-p4", 0), ("hot-4090", 1), ("cpu", 0),
                                               ("p4-without-offload", 1)])
def test_the_command_judges_a_saved_snapshot(app: typer.Typer, snapshot_file: Callable[[str], str],
                                             machine: str, code: int) -> None:
    result = CliRunner().invoke(app, ["doctor", "--snapshot", snapshot_file(machine), "--json"])
    assert result.exit_code == code, result.output
    report = json.loads(result.stdout)
    assert report["exit_code"] == code
    assert {c["status"] for c in report["checks"]} <= {"pass", "warn", "fail", "skip"}
    table = CliRunner().invoke(app, ["doctor", "--snapshot", snapshot_file(machine)],
                               env={"COLUMNS": "200"})
    assert table.exit_code == code
    assert ("not ready" in table.stdout) == bool(code)


def test_an_unreadable_snapshot_is_a_usage_error(app: typer.Typer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = CliRunner().invoke(app, ["doctor", "--snapshot", str(bad)])
    assert result.exit_code == 2


def test_doctor_on_this_machine(app: typer.Typer, tmp_path: Path) -> None:
    """The real probe: this machine has no GPU, so it says so and checks cores, RAM, disk and ports; the
    snapshot it saves replays to the same verdicts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        saved = tmp_path / "here.json"
        result = CliRunner().invoke(app, ["doctor", "--json", "--card", "cpu", "--port", str(port),
                                             "--save-snapshot", str(saved)])
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks[f"host.port.{port}"]["status"] == "fail"
    assert result.exit_code == 1
    assert checks["plan"]["status"] == "pass" and "embedded on the CPU" in checks["plan"]["detail"]
    assert checks["llama_cpp.build"]["status"] == "pass"
    assert checks["host.cpus"]["status"] in {"pass", "warn"}
    replay = CliRunner().invoke(app, ["doctor", "--json", "--snapshot", str(saved)])
    assert json.loads(replay.stdout)["checks"] == report["checks"]


def test_preflight_is_a_thin_wrapper() -> None:
    script = ROOT / "phase1_foundation" / "preflight.sh"
    assert "doctor" in script.read_text()
    proc = subprocess.run([str(script), "--json", "--card", "cpu", "--port", "1"], capture_output=True,
                          text=True, timeout=120, check=False)
    report = json.loads(proc.stdout)
    assert any(c["name"] == "host.port.1" for c in report["checks"])
    assert proc.returncode == report["exit_code"]


def test_this_machines_sglang_cannot_serve_a_gpu(machines: dict[str, HostSnapshot]) -> None:
    """The real SGLang probe: here torch is a CPU build (or absent), so on an SM89 card the check fails."""
    install = probe_sglang(ask_torch=True)
    if not install.installed:
        pytest.skip("sglang is not installed in this environment")
    assert install.version
    on_a_4090 = machines["hot-4090"].model_copy(update={"sglang": install})
    check = _by_name(run_checks(on_a_4090))[("sglang", None)]
    assert check.status == "fail", check
    reasons = ("CPU build of torch", "does not see the GPU", "does not import")
    assert any(why in check.detail for why in reasons)
