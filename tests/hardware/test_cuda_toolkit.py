"""The CUDA toolkit llama.cpp needs per card: CUDA 12.x only below compute capability 7.5 (CUDA 13 dropped
Maxwell, Pascal and Volta), 12.8+ for Blackwell, 11.8+ for Ada and Hopper; and `edgeserve gpu` shows it."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from quantize.model.units import GIB, MIB
from server.cli import gpu as gpu_cli
from server.hardware.cards import all_cards, get_card
from server.hardware.cuda_toolkit import CUDA13_DROP_SOURCES, FIRST_TOOLKIT, cuda_toolkit_for
from server.hardware.detect import GpuInfo, build_detection, card_from_nvml, detect_cpu


@pytest.mark.parametrize(
    ("card_id", "label", "ok", "refused"),
    [
        ("tesla-p4", "12.x only", (12, 9), (13, 0)),
        ("tesla-p40", "12.x only", (12, 4), (13, 1)),
        ("tesla-p100-16gb", "12.x only", (11, 8), (13, 0)),
        ("tesla-v100-16gb", "12.x only", (12, 9), (13, 0)),
        ("tesla-t4", "any", (13, 0), None),  # sm_75 stays in CUDA 13
        ("rtx-3060-12gb", "11.1+", (13, 0), (11, 0)),
        ("rtx-a4000", "11.1+", (12, 4), (11, 0)),
        ("a100-40gb", "11.0+", (11, 0), (10, 2)),
        ("rtx-4060-ti-16gb", "11.8+", (11, 8), (11, 7)),
        ("l40s", "11.8+", (13, 0), (11, 7)),
        ("h100-80gb", "11.8+", (12, 0), (11, 7)),
        ("rtx-5060-ti-16gb", "12.8+", (12, 8), (12, 6)),
        ("rtx-5080", "12.8+", (13, 0), (12, 6)),
        ("rtx-5090", "12.8+", (12, 9), (12, 4)),
    ],
)
def test_toolkit_range_per_card(
    card_id: str, label: str, ok: tuple[int, int], refused: tuple[int, int] | None
) -> None:
    toolkit = get_card(card_id).cuda_toolkit
    assert toolkit is not None and toolkit.label == label
    assert toolkit.allows(ok)
    if refused is not None:
        assert not toolkit.allows(refused)


def test_cuda_13_drops_exactly_the_sms_below_7_5() -> None:
    for card in all_cards():
        toolkit = card.cuda_toolkit
        assert toolkit is not None
        assert toolkit.allows((13, 0)) is (card.compute_capability >= (7, 5)), card.id
        if card.architecture in ("Pascal", "Volta"):
            assert toolkit.max_major == 12 and "CUDA 12.x toolkit" in toolkit.reason
    assert cuda_toolkit_for((7, 2)).max_major == 12  # Xavier, Volta's Jetson
    assert cuda_toolkit_for((7, 5)).max_major is None
    assert "12.8 or newer" in cuda_toolkit_for((12, 0)).reason
    assert "sm_61" in cuda_toolkit_for((6, 1)).reason


def test_the_rule_cites_nvidia() -> None:
    assert all(url.startswith("https://") for url in CUDA13_DROP_SOURCES)
    assert all(src.startswith("https://") for _, _, src in FIRST_TOOLKIT)
    # newest architecture first, so the first threshold a capability reaches is its own
    assert [low for low, _, _ in FIRST_TOOLKIT] == sorted((low for low, _, _ in FIRST_TOOLKIT), reverse=True)


def test_a_card_without_a_known_capability_has_no_toolkit_rule() -> None:
    unknown = GpuInfo(
        index=0, name="Mystery GPU", memory_total_bytes=GIB, memory_free_bytes=GIB, memory_used_bytes=0
    )
    assert card_from_nvml(unknown).cuda_toolkit is None


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    gpu_cli.register(app)

    @app.command("noop", hidden=True)
    def _noop() -> None:
        pass

    return app


def test_gpu_cards_shows_the_toolkit() -> None:
    result = CliRunner().invoke(_app(), ["gpu", "--cards", "--json"])
    assert result.exit_code == 0, result.output
    rows = {c["id"]: c for c in json.loads(result.stdout)["cards"]}
    assert rows["tesla-p40"]["cuda_toolkit"] == "12.x only"
    assert rows["rtx-5080"]["cuda_toolkit"] == "12.8+"
    table = CliRunner().invoke(_app(), ["gpu", "--cards"], env={"COLUMNS": "240"})
    assert table.exit_code == 0 and "CUDA" in table.stdout and "12.8+" in table.stdout


def test_gpu_summary_of_a_detected_p40_names_the_toolkit() -> None:
    p40 = GpuInfo(
        index=0,
        name="Tesla P40",
        memory_total_bytes=24451 * MIB,
        memory_free_bytes=24000 * MIB,
        memory_used_bytes=0,
        compute_capability=(6, 1),
    )
    det = build_detection([p40], detect_cpu(), driver_version="580.95.05", cuda_version="13.0")
    summary = gpu_cli._card_summary(det)
    assert "CUDA toolkit for llama.cpp: 12.x only" in summary and "sm_61" in summary
