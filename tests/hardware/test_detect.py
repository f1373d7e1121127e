"""GPU detection: pure assembly from device figures, the real call on this machine, `edgeserve gpu`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from quantize.model.units import GIB, MIB
from server.cli import gpu as gpu_cli
from server.hardware.cards import get_card
from server.hardware.detect import (
    CpuInfo,
    Detection,
    GpuInfo,
    architecture_for,
    build_detection,
    card_from_nvml,
    cuda_version_string,
    detect,
    detect_cpu,
    gpu_set_from_detection,
    parse_cpuinfo,
    parse_meminfo,
    sample_gpu_metrics,
)

ROOT = Path(__file__).resolve().parents[2]

CPU = CpuInfo(
    model_name="Test CPU", logical_cpus=4, usable_cpus=4, physical_cores=2, total_ram_bytes=16 * GIB
)


def _gpu(index: int, name: str, total_mib: int, cc: tuple[int, int], **extra: object) -> GpuInfo:
    total = total_mib * MIB
    return GpuInfo(
        index=index,
        name=name,
        memory_total_bytes=total,
        memory_free_bytes=total - 500 * MIB,
        memory_used_bytes=500 * MIB,
        compute_capability=cc,
        **extra,  # type: ignore[arg-type]
    )


def test_two_5090s_make_the_5090_pair() -> None:
    gpus = [
        _gpu(
            i,
            "NVIDIA GeForce RTX 5090",
            32607,
            (12, 0),
            pcie_gen_max=5,
            has_nvlink=None,
            power_max_limit_w=600.0,
        )
        for i in range(2)
    ]
    det = build_detection(gpus, CPU, driver_version="575.51", cuda_version="12.9")
    assert not det.is_cpu_only
    assert det.card == get_card("rtx-5090")
    assert det.count == 2
    assert [g.card_id for g in det.gpus] == ["rtx-5090", "rtx-5090"]
    assert det.reason is None
    gpu_set = gpu_set_from_detection(det)
    assert gpu_set is not None
    assert gpu_set.count == 2
    assert gpu_set.link.pcie_gen == 5 and gpu_set.link.has_nvlink is False
    assert gpu_set.memory_bytes_per_gpu == 32607 * MIB
    assert gpu_set.total_memory_bytes == 2 * 32607 * MIB


def test_memory_picks_the_right_a100_and_nvlink_is_seen() -> None:
    gpus = [
        _gpu(i, "NVIDIA A100-SXM4-80GB", 81920, (8, 0), has_nvlink=True, pcie_gen_max=4) for i in range(4)
    ]
    det = build_detection(gpus, CPU)
    assert det.card is not None and det.card.id == "a100-80gb"
    gpu_set = gpu_set_from_detection(det)
    assert gpu_set is not None and gpu_set.count == 4 and gpu_set.link.has_nvlink is True


def test_an_unknown_card_still_works_from_its_nvml_figures() -> None:
    gpu = _gpu(0, "NVIDIA GeForce RTX 3090 Ti", 24564, (8, 6), pcie_gen_max=4, power_default_limit_w=450.0)
    det = build_detection([gpu], CPU)
    assert det.gpus[0].card_id is None
    card = det.card
    assert card is not None
    assert not card.is_from_table
    assert card.id == "nvml-nvidia-geforce-rtx-3090-ti"
    assert card.architecture == "Ampere"
    assert card.compute_capability == (8, 6)
    assert card.memory_bytes == 24564 * MIB
    assert card.tdp_w == 450
    assert card.can_run_sglang and card.has_flash_attn_kernels and not card.can_fp8_kv
    gpu_set = gpu_set_from_detection(det)
    assert gpu_set is not None and gpu_set.memory_bytes_per_gpu == 24564 * MIB
    # The synthesized row is JSON-printable like any other.
    assert Detection.model_validate_json(det.model_dump_json()) == det


def test_mixed_gpus_plan_for_the_first_model_and_say_so() -> None:
    gpus = [
        _gpu(0, "NVIDIA GeForce RTX 5090", 32607, (12, 0)),
        _gpu(1, "NVIDIA GeForce RTX 3090", 24576, (8, 6)),
    ]
    det = build_detection(gpus, CPU)
    assert det.count == 1
    assert det.reason is not None and "mixed GPUs" in det.reason and "RTX 3090" in det.reason
    assert [g.card_id for g in det.gpus] == ["rtx-5090", "rtx-3090"]


def test_no_gpus_is_a_cpu_result() -> None:
    det = build_detection([], CPU, reason="NVML unavailable: Driver Not Loaded")
    assert det.is_cpu_only and det.card is None and det.count == 0
    assert det.reason == "NVML unavailable: Driver Not Loaded"
    assert gpu_set_from_detection(det) is None


def test_card_from_nvml_without_compute_capability() -> None:
    card = card_from_nvml(
        _gpu(0, "Mystery GPU", 1000, (0, 0)).model_copy(update={"compute_capability": None})
    )
    assert card.architecture == "unknown"
    assert not card.can_run_sglang and not card.has_int8_dp4a


@pytest.mark.parametrize(
    ("cc", "arch"),
    [
        ((6, 1), "Pascal"),
        ((7, 0), "Volta"),
        ((7, 5), "Turing"),
        ((8, 0), "Ampere"),
        ((8, 6), "Ampere"),
        ((8, 9), "Ada Lovelace"),
        ((9, 0), "Hopper"),
        ((10, 0), "Blackwell"),
        ((12, 0), "Blackwell"),
        ((5, 2), "unknown"),
    ],
)
def test_architecture_for(cc: tuple[int, int], arch: str) -> None:
    assert architecture_for(cc) == arch


def test_architecture_for_agrees_with_the_table() -> None:
    from server.hardware.cards import all_cards

    for card in all_cards():
        assert architecture_for(card.compute_capability) == card.architecture


def test_cuda_version_string() -> None:
    assert cuda_version_string(12040) == "12.4"
    assert cuda_version_string(13000) == "13.0"
    assert cuda_version_string(None) is None


def test_parse_proc_files() -> None:
    cpuinfo = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t: 0\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t: 0\n\n"
        "processor\t: 2\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t: 1\n"
    )
    assert parse_cpuinfo(cpuinfo) == ("AMD EPYC 7B13", 2)
    assert parse_cpuinfo("") == (None, None)
    meminfo = "MemTotal:       24731708 kB\nMemFree:  100 kB\nMemAvailable:   23782772 kB\n"
    assert parse_meminfo(meminfo) == (24731708 * 1024, 23782772 * 1024)


def test_detect_cpu_on_this_machine() -> None:
    cpu = detect_cpu()
    assert cpu.logical_cpus == os.cpu_count()
    assert 1 <= cpu.usable_cpus <= cpu.logical_cpus
    assert cpu.model_name
    if Path("/proc/meminfo").exists():
        assert cpu.total_ram_bytes is not None and cpu.total_ram_bytes > 256 * MIB


def test_detect_on_this_machine_never_raises() -> None:
    det = detect()
    assert Detection.model_validate_json(det.model_dump_json()) == det
    if det.is_cpu_only:
        assert det.gpus == () and det.card is None and det.count == 0
        assert det.reason  # says why
        assert gpu_set_from_detection(det) is None
        assert sample_gpu_metrics() == ()
    else:
        assert det.card is not None and 1 <= det.count <= len(det.gpus)


def _nvml_gpu_present() -> bool:
    return not detect().is_cpu_only


@pytest.mark.skipif(not _nvml_gpu_present(), reason="no NVIDIA GPU/driver on this machine")
def test_detect_on_a_gpu_host() -> None:
    det = detect()
    assert det.driver_version and det.cuda_version
    for gpu in det.gpus:
        assert gpu.memory_total_bytes > 0
        assert gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert gpu.compute_capability is not None and gpu.compute_capability >= (6, 0)
    samples = sample_gpu_metrics()
    assert [s.index for s in samples] == [g.index for g in det.gpus]
    assert all(s.memory_total_bytes == g.memory_total_bytes for s, g in zip(samples, det.gpus, strict=True))
    gpu_set = gpu_set_from_detection(det)
    assert gpu_set is not None and gpu_set.memory_bytes_per_gpu == det.gpus[0].memory_total_bytes


# --- the command --------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Group mode, so `gpu` is a sub-command as in the real app."""

    gpu_cli.register(app)
    return app


def test_gpu_json_command() -> None:
    result = CliRunner().invoke(_app(), ["gpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    det = detect()
    assert data["is_cpu_only"] == det.is_cpu_only
    assert data["cpu"]["logical_cpus"] == os.cpu_count()
    assert Detection.model_validate(data) == det


def test_gpu_table_command() -> None:
    result = CliRunner().invoke(_app(), ["gpu"])
    assert result.exit_code == 0, result.output
    assert ("CPU only" in result.stdout) if detect().is_cpu_only else ("GPUs" in result.stdout)


def test_gpu_cards_listing() -> None:
    result = CliRunner().invoke(_app(), ["gpu", "--cards", "--json"])
    assert result.exit_code == 0, result.output
    ids = [c["id"] for c in json.loads(result.stdout)["cards"]]
    assert "rtx-5090" in ids and "tesla-p4" in ids
    table = CliRunner().invoke(_app(), ["gpu", "--cards"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "h100-80gb" in table.stdout


def _real_app_importable() -> bool:
    try:
        import server.cli.app  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not (ROOT / ".venv/bin/edgeserve").exists(), reason="no .venv/bin/edgeserve (run setup)")
@pytest.mark.skipif(
    not _real_app_importable(), reason="server.cli.app does not import yet (sibling commands)"
)
def test_edgeserve_gpu_json_console_script() -> None:
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/edgeserve"), "gpu", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) >= {"gpus", "card", "count", "is_cpu_only", "driver_version", "cuda_version", "cpu"}
