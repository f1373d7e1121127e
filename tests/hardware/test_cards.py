"""The card table and name matching: the figures the seed documents got wrong are pinned here."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from quantize.model.units import GIB, MIB
from server.hardware.cards import (
    SOURCED_FIELDS,
    Card,
    GpuSet,
    UnknownCardError,
    all_cards,
    card_ids,
    get_card,
    match_card,
)

REQUIRED_IDS = (
    "tesla-p4",
    "tesla-t4",
    "rtx-3090",
    "rtx-4090",
    "rtx-5090",
    "l4",
    "a10",
    "a100-40gb",
    "a100-80gb",
    "h100-80gb",
    "h200",
)  # and the cards people run small: tests/hardware/test_cards_small.py


def test_every_required_id_is_in_the_table() -> None:
    ids = card_ids()
    assert set(REQUIRED_IDS) <= set(ids)
    assert len(ids) == len(set(ids))
    assert [c.id for c in all_cards()] == list(ids)


def test_rtx_5090_is_blackwell_not_what_the_seed_said() -> None:
    card = get_card("rtx-5090")
    assert card.architecture == "Blackwell"
    assert card.chip == "GB202"
    assert card.compute_capability == (12, 0)
    assert card.sm_count == 170
    assert card.cuda_cores == 21_760
    assert card.memory_bytes == 32 * GIB
    assert card.memory_type == "GDDR7"
    assert card.bandwidth_gbps == 1792.0
    assert card.tdp_w == 575
    assert card.pcie_gen == 5
    assert card.has_nvlink is False
    # The seed's claims, explicitly refuted.
    assert card.architecture != "Ada Lovelace"
    assert card.compute_capability != (8, 9)
    assert card.bandwidth_gbps != 1500.0
    assert card.cuda_cores != 16_384


def test_tesla_p4_is_pascal_and_cannot_run_sglang() -> None:
    card = get_card("tesla-p4")
    assert card.architecture == "Pascal"
    assert card.chip == "GP104"
    assert card.compute_capability == (6, 1)
    assert (card.sm_count, card.cuda_cores) == (20, 2560)
    assert card.memory_bytes == 8 * GIB
    assert card.memory_type == "GDDR5"
    assert (card.bandwidth_gbps, card.tdp_w) == (192.0, 75)
    assert card.tensor_core_gen is None and not card.has_tensor_cores
    assert card.fp16_to_fp32_ratio == pytest.approx(1 / 64)
    assert card.has_fast_fp16 is False
    assert card.has_int8_dp4a is True
    assert card.can_run_sglang is False
    assert card.can_fp8_kv is False
    assert card.has_fp8 is False
    # llama.cpp's own CUDA flash-attention kernels run on Pascal; the FlashAttention libraries do not.
    assert card.has_flash_attn_kernels is True
    assert card.has_flash_attn2_library is False
    assert card.has_flash_attn3_library is False


@pytest.mark.parametrize(
    ("card_id", "sglang", "fp8", "fa2", "fa3"),
    [
        ("tesla-p4", False, False, False, False),
        ("tesla-t4", False, False, False, False),  # SM75: dropped by current SGLang builds
        ("rtx-3090", True, False, True, False),
        ("a10", True, False, True, False),
        ("a100-40gb", True, False, True, False),
        ("a100-80gb", True, False, True, False),
        ("rtx-4090", True, True, True, False),
        ("l4", True, True, True, False),
        ("h100-80gb", True, True, True, True),
        ("h200", True, True, True, True),
        ("rtx-5090", True, True, True, False),
        ("tesla-p40", False, False, False, False),
        ("tesla-p100-16gb", False, False, False, False),
        ("tesla-v100-16gb", False, False, False, False),  # SM70: below edgeserve's SGLang floor
        ("tesla-v100-32gb", False, False, False, False),
        ("rtx-3060-12gb", True, False, True, False),
        ("rtx-a4000", True, False, True, False),
        ("rtx-a5000", True, False, True, False),
        ("rtx-4060-ti-16gb", True, True, True, False),
        ("l40s", True, True, True, False),
        ("rtx-5060-ti-16gb", True, True, True, False),
        ("rtx-5080", True, True, True, False),
    ],
)
def test_serving_capabilities(card_id: str, sglang: bool, fp8: bool, fa2: bool, fa3: bool) -> None:
    card = get_card(card_id)
    assert card.can_run_sglang is sglang
    assert card.can_fp8_kv is fp8
    assert card.has_fp8 is fp8
    assert card.has_flash_attn2_library is fa2
    assert card.has_flash_attn3_library is fa3
    assert card.has_flash_attn_kernels is True


def test_every_figure_has_a_source() -> None:
    for card in all_cards():
        assert card.is_from_table
        for field in SOURCED_FIELDS:
            if getattr(card, field) is None and field != "tensor_core_gen":
                continue
            url = card.sources.get(field)
            assert url and url.startswith("https://"), f"{card.id}.{field} has no source"
        # The figures a plan leans on are there, or the row says no source for them was found.
        for field in ("sm_count", "cuda_cores", "bandwidth_gbps", "tdp_w", "pcie_gen", "has_nvlink"):
            value = getattr(card, field)
            assert value is not None or field in card.unsourced, f"{card.id}.{field} missing"
            assert value is None or field not in card.unsourced, f"{card.id}.{field} set yet unsourced"


def test_an_unsourced_figure_must_be_unknown() -> None:
    data = get_card("rtx-a5000").model_dump()
    assert data["unsourced"] == ("pcie_gen", "has_nvlink")
    with pytest.raises(ValidationError, match="unsourced lists"):
        Card(**{**data, "pcie_gen": 4, "sources": {**data["sources"], "pcie_gen": "https://example.org"}})
    with pytest.raises(ValidationError, match="unsourced lists"):
        Card(**{**data, "unsourced": ("tensor_core_gen",)})  # None there claims no tensor cores


def test_usable_memory_is_a_little_below_nominal() -> None:
    for card in all_cards():
        assert 0.9 * card.memory_bytes <= card.usable_memory_bytes <= card.memory_bytes
    assert get_card("rtx-5090").usable_memory_bytes == 32607 * MIB
    assert get_card("h100-80gb").usable_memory_bytes == 81559 * MIB


def test_a_row_without_sources_is_rejected() -> None:
    data = get_card("l4").model_dump()
    data["sources"] = {k: v for k, v in data["sources"].items() if k != "bandwidth_gbps"}
    with pytest.raises(ValidationError, match="no source for bandwidth_gbps"):
        Card(**data)


def test_card_is_frozen_hashable_and_json_round_trips() -> None:
    card = get_card("h200")
    with pytest.raises(ValidationError):
        card.tdp_w = 1  # type: ignore[misc]
    assert len(set(all_cards())) == len(all_cards())
    again = Card.model_validate_json(card.model_dump_json())
    assert again == card


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("rtx-5090", "rtx-5090"),
        ("RTX-5090", "rtx-5090"),
        ("Tesla-P4", "tesla-p4"),
        ("H200", "h200"),
        ("Tesla P4", "tesla-p4"),
        ("tesla t4", "tesla-t4"),
        ("NVIDIA GeForce RTX 5090", "rtx-5090"),
        ("nvidia geforce rtx 4090", "rtx-4090"),
        ("NVIDIA GeForce RTX 3090", "rtx-3090"),
        ("GeForce RTX 3090", "rtx-3090"),
        ("RTX 5090", "rtx-5090"),
        ("NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("NVIDIA H100 PCIe", "h100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200"),
    ],
)
def test_get_card_accepts_ids_and_names(key: str, expected: str) -> None:
    assert get_card(key).id == expected


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA GeForce RTX 4090 D",
        "NVIDIA GeForce RTX 5090 Laptop GPU",
        "NVIDIA H100 NVL",
        "NVIDIA L40",  # not the L40S
        "NVIDIA A10G",
        "NVIDIA GeForce RTX 3060 Ti",
        "NVIDIA GeForce RTX 4060",  # not the 4060 Ti
        "NVIDIA GeForce RTX 5080 Laptop GPU",
        "NVIDIA RTX A4000 Laptop GPU",
        "Tesla P100-PCIE-12GB",
        "Tesla V100S-PCIE-32GB",
        "",
    ],
)
def test_other_cards_of_the_same_family_do_not_match(name: str) -> None:
    assert match_card(name) is None


def test_memory_tells_the_a100s_apart_and_rejects_other_sizes() -> None:
    assert match_card("NVIDIA A100", 40960 * MIB) == get_card("a100-40gb")
    assert match_card("NVIDIA A100", 81920 * MIB) == get_card("a100-80gb")
    assert match_card("NVIDIA A100-PCIE-40GB", 40536 * MIB) == get_card("a100-40gb")
    assert match_card("NVIDIA H100 PCIe", 81559 * MIB) == get_card("h100-80gb")
    assert match_card("NVIDIA H100", 95830 * MIB) is None  # the 94 GB NVL part
    assert match_card("Tesla P4", 7611 * MIB) == get_card("tesla-p4")  # ECC on


def test_unknown_card_error_lists_the_known_ids() -> None:
    with pytest.raises(UnknownCardError) as info:
        get_card("gtx-1080")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "gtx-1080" in message
    for card_id in REQUIRED_IDS:
        assert card_id in message


def test_ambiguous_key_names_the_candidates() -> None:
    with pytest.raises(UnknownCardError, match=r"ambiguous \(a100-40gb, a100-80gb\)"):
        get_card("a100")


def test_gpu_set_of_two_5090s() -> None:
    pair = GpuSet.of(get_card("rtx-5090"), 2)
    assert pair.count == 2
    assert pair.label == "2x rtx-5090"
    assert pair.link.pcie_gen == 5
    assert pair.link.has_nvlink is False
    assert pair.memory_bytes_per_gpu == 32607 * MIB
    assert pair.nominal_memory_bytes_per_gpu == 32 * GIB
    assert pair.total_memory_bytes == 2 * 32607 * MIB
    assert GpuSet.model_validate_json(pair.model_dump_json()) == pair


def test_gpu_set_link_and_measured_memory() -> None:
    h100 = get_card("h100-80gb")
    assert GpuSet.of(h100, 2, has_nvlink=True).link.has_nvlink is True
    assert GpuSet.of(h100, 1, has_nvlink=True).link.has_nvlink is False  # one GPU has no peer
    assert GpuSet.of(get_card("rtx-4090"), 2, has_nvlink=True).link.has_nvlink is False  # no NVLink on Ada
    capped = GpuSet(card=h100, count=1, measured_memory_bytes=8 * GIB)
    assert capped.memory_bytes_per_gpu == 8 * GIB
    with pytest.raises(ValidationError):
        GpuSet(card=h100, count=0)
