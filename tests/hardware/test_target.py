"""What a plan is for: the one `resolve_target` (--card / --gpus) and the one "no GPU" value, CpuTarget;
the card table read as package data."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from quantize.model.units import GIB, MIB
from server.hardware.cards import CARD_TABLES, GpuSet, UnknownCardError, all_cards, card_from_row
from server.hardware.target import CPU_ID, CpuTarget, TargetError, resolve_target


def test_the_cpu_is_cpu_target_by_name_or_by_zero_gpus() -> None:
    for target in (resolve_target("cpu"), resolve_target("CPU"), resolve_target("auto", 0)):
        assert isinstance(target, CpuTarget) and target.ram_bytes > 0
        assert target.card_id == CPU_ID == "cpu" and target.count == 0


def test_a_card_id_needs_no_gpu_here() -> None:
    pair = resolve_target("rtx-5090", 2)
    assert isinstance(pair, GpuSet) and pair.card_id == "rtx-5090" and pair.count == 2
    assert resolve_target("NVIDIA Tesla P4").card_id == "tesla-p4"


def test_contradictions_are_one_line_errors() -> None:
    with pytest.raises(TargetError, match="--card cpu"):
        resolve_target("cpu", 2)
    with pytest.raises(TargetError, match="0"):
        resolve_target("l4", -1)
    with pytest.raises(UnknownCardError, match="known ids"):
        resolve_target("voodoo-5")


def test_the_card_table_is_data_with_units_in_its_keys() -> None:
    package = resources.files("server.hardware")
    rows = [
        row
        for name in CARD_TABLES
        for row in yaml.safe_load(package.joinpath(name).read_text(encoding="utf-8"))["cards"]
    ]
    assert [r["id"] for r in rows] == [c.id for c in all_cards()]
    p4 = next(r for r in rows if r["id"] == "tesla-p4")
    assert p4["memory_gib"] == 8 and "memory_gib" in p4["sources"]
    card = card_from_row(p4)
    assert card.memory_bytes == 8 * GIB and card.sources["memory_bytes"].startswith("https://")
    t4 = card_from_row(next(r for r in rows if r["id"] == "tesla-t4"))
    assert t4.nvml_memory_bytes == 15360 * MIB
