"""The cards people run small (issue 11): the figures easy to get wrong are pinned, and NVML's names map to
the right row, memory telling the 8 GB cards from the 12/16 GB rows and the V100 16 GB from the 32 GB."""

from __future__ import annotations

import pytest

from quantize.model.units import GIB, MIB
from server.hardware.cards import CARD_TABLES, UnknownCardError, all_cards, get_card, match_card
from server.hardware.detect import GpuInfo, with_card_ids

SMALL_IDS = (
    "tesla-p40",
    "tesla-p100-16gb",
    "tesla-v100-16gb",
    "tesla-v100-32gb",
    "rtx-3060-12gb",
    "rtx-a4000",
    "rtx-a5000",
    "rtx-4060-ti-16gb",
    "rtx-5060-ti-16gb",
    "rtx-5080",
    "l40s",
)


def test_the_small_cards_are_their_own_table_read_after_the_first() -> None:
    assert CARD_TABLES == ("cards.yaml", "cards_small.yaml")
    ids = [c.id for c in all_cards()]
    assert ids[-len(SMALL_IDS) :] == list(SMALL_IDS)
    for card_id in SMALL_IDS:
        card = get_card(card_id)
        for field in ("compute_capability", "memory_bytes", "bandwidth_gbps", "tdp_w"):
            assert card.sources[field].startswith("https://"), f"{card_id}.{field}"


def test_p100_is_cc_6_0_with_fast_fp16_and_no_dp4a() -> None:
    card = get_card("tesla-p100-16gb")
    assert (card.architecture, card.chip, card.compute_capability) == ("Pascal", "GP100", (6, 0))
    assert (card.sm_count, card.cuda_cores) == (56, 3584)
    assert card.memory_bytes == 16 * GIB and card.memory_type == "HBM2"
    assert card.nvml_memory_bytes == 16384 * MIB  # HBM2 ECC costs no capacity
    assert (card.bandwidth_gbps, card.tdp_w, card.pcie_gen) == (732.0, 250, 3)
    assert card.fp16_to_fp32_ratio == 2.0 and card.has_fast_fp16
    assert not card.has_int8_dp4a  # dp4a is 6.1: the P100 is the one Pascal without it
    assert not card.has_tensor_cores and card.has_nvlink is False
    assert card.has_flash_attn_kernels and not card.can_run_sglang


def test_p40_is_a_big_p4() -> None:
    card = get_card("tesla-p40")
    assert (card.chip, card.compute_capability, card.sm_count, card.cuda_cores) == ("GP102", (6, 1), 30, 3840)
    assert card.memory_bytes == 24 * GIB and card.memory_type == "GDDR5"
    assert (card.bandwidth_gbps, card.tdp_w) == (346.0, 250)
    assert card.fp16_to_fp32_ratio == pytest.approx(1 / 64) and not card.has_fast_fp16
    assert card.has_int8_dp4a and not card.has_tensor_cores
    assert card.has_nvlink is None and card.unsourced == ("has_nvlink",)


@pytest.mark.parametrize(("card_id", "gib"), [("tesla-v100-16gb", 16), ("tesla-v100-32gb", 32)])
def test_v100_is_cc_7_0_with_first_generation_tensor_cores(card_id: str, gib: int) -> None:
    card = get_card(card_id)
    assert (card.architecture, card.chip, card.compute_capability) == ("Volta", "GV100", (7, 0))
    assert card.tensor_core_gen == 1
    assert (card.sm_count, card.cuda_cores, card.memory_bytes) == (80, 5120, gib * GIB)
    assert (card.bandwidth_gbps, card.tdp_w, card.variant) == (900.0, 250, "PCIe")
    assert card.fp16_to_fp32_ratio == 2.0 and card.has_nvlink is False
    assert not card.can_run_sglang and not card.has_fp8 and not card.has_flash_attn2_library


@pytest.mark.parametrize(
    ("card_id", "chip", "sms", "cores", "gbps", "watts", "lanes"),
    [
        ("rtx-5060-ti-16gb", "GB206", 36, 4608, 448.0, 180, 8),
        ("rtx-5080", "GB203", 84, 10752, 960.0, 360, 16),
    ],
)
def test_consumer_blackwell_is_cc_12_0(
    card_id: str, chip: str, sms: int, cores: int, gbps: float, watts: int, lanes: int
) -> None:
    card = get_card(card_id)
    assert (card.architecture, card.chip, card.compute_capability) == ("Blackwell", chip, (12, 0))
    assert (card.sm_count, card.cuda_cores, card.bandwidth_gbps, card.tdp_w) == (sms, cores, gbps, watts)
    assert card.memory_bytes == 16 * GIB and card.memory_type == "GDDR7"
    assert (card.pcie_gen, card.pcie_lanes, card.tensor_core_gen) == (5, lanes, 5)
    assert card.compute_capability != (8, 9)  # not Ada
    assert card.can_fp8_kv and card.has_nvlink is False


def test_4060_ti_16gb_is_ada_8_9_on_eight_lanes() -> None:
    card = get_card("rtx-4060-ti-16gb")
    assert (card.architecture, card.chip, card.compute_capability) == ("Ada Lovelace", "AD106", (8, 9))
    assert (card.sm_count, card.cuda_cores, card.memory_bytes) == (34, 4352, 16 * GIB)
    assert (card.bandwidth_gbps, card.tdp_w, card.pcie_gen, card.pcie_lanes) == (288.0, 165, 4, 8)
    assert card.tensor_core_gen == 4 and card.can_fp8_kv


def test_l40s_is_48_gb_ada() -> None:
    card = get_card("l40s")
    assert (card.chip, card.compute_capability) == ("AD102", (8, 9))
    assert (card.sm_count, card.cuda_cores) == (142, 18176)
    assert card.memory_bytes == 48 * GIB and card.nvml_memory_bytes == 46068 * MIB
    assert (card.bandwidth_gbps, card.tdp_w, card.pcie_gen) == (864.0, 350, 4)
    assert card.can_fp8_kv and card.has_nvlink is False


@pytest.mark.parametrize(
    ("card_id", "chip", "sms", "cores", "gib", "gbps", "watts"),
    [
        ("rtx-3060-12gb", "GA106", 28, 3584, 12, 360.0, 170),
        ("rtx-a4000", "GA104", 48, 6144, 16, 448.0, 140),
        ("rtx-a5000", "GA102", 64, 8192, 24, 768.0, 230),
    ],
)
def test_ampere_8_6_cards(
    card_id: str, chip: str, sms: int, cores: int, gib: int, gbps: float, watts: int
) -> None:
    card = get_card(card_id)
    assert (card.architecture, card.chip, card.compute_capability) == ("Ampere", chip, (8, 6))
    assert (card.sm_count, card.cuda_cores, card.memory_bytes) == (sms, cores, gib * GIB)
    assert (card.bandwidth_gbps, card.tdp_w, card.tensor_core_gen) == (gbps, watts, 3)
    assert card.can_run_sglang and not card.can_fp8_kv


def test_unsourced_figures_stay_unknown_on_the_a5000() -> None:
    card = get_card("rtx-a5000")
    assert card.pcie_gen is None and card.has_nvlink is None
    assert set(card.unsourced) == {"pcie_gen", "has_nvlink"}


@pytest.mark.parametrize(
    ("nvml_name", "mib", "expected"),
    [
        ("Tesla P40", 24451, "tesla-p40"),
        ("Tesla P100-PCIE-16GB", 16384, "tesla-p100-16gb"),
        ("Tesla P100-SXM2-16GB", 16280, "tesla-p100-16gb"),  # the SXM2 card maps to the PCIe row
        ("Tesla V100-PCIE-16GB", 16160, "tesla-v100-16gb"),
        ("Tesla V100-SXM2-16GB", 16130, "tesla-v100-16gb"),
        ("Tesla V100-PCIE-32GB", 32510, "tesla-v100-32gb"),
        ("Tesla V100-SXM2-32GB", 32480, "tesla-v100-32gb"),
        ("NVIDIA GeForce RTX 3060", 12288, "rtx-3060-12gb"),
        ("NVIDIA GeForce RTX 4060 Ti", 16380, "rtx-4060-ti-16gb"),
        ("NVIDIA GeForce RTX 5060 Ti", 16311, "rtx-5060-ti-16gb"),
        ("NVIDIA GeForce RTX 5080", 16303, "rtx-5080"),
        ("NVIDIA L40S", 46068, "l40s"),
        ("NVIDIA RTX A4000", 16376, "rtx-a4000"),
        ("NVIDIA RTX A5000", 24564, "rtx-a5000"),
    ],
)
def test_nvml_names_map_to_their_rows(nvml_name: str, mib: int, expected: str) -> None:
    assert (card := match_card(nvml_name, mib * MIB)) is not None and card.id == expected
    assert (card := match_card(nvml_name)) is not None and card.id == expected


@pytest.mark.parametrize(
    ("nvml_name", "mib"),
    [
        ("NVIDIA GeForce RTX 3060", 8192),  # the 8 GB RTX 3060: same name, a third less memory
        ("NVIDIA GeForce RTX 4060 Ti", 8188),
        ("NVIDIA GeForce RTX 5060 Ti", 8151),
        ("Tesla P100-PCIE-12GB", 12198),
        ("Tesla V100", 24000),  # no V100 of that size
    ],
)
def test_memory_rejects_the_other_size_of_a_name(nvml_name: str, mib: int) -> None:
    assert match_card(nvml_name, mib * MIB) is None


def test_memory_tells_the_v100s_apart() -> None:
    assert match_card("Tesla V100", 16160 * MIB) == get_card("tesla-v100-16gb")
    assert match_card("Tesla V100", 32510 * MIB) == get_card("tesla-v100-32gb")
    with pytest.raises(UnknownCardError, match=r"ambiguous \(tesla-v100-16gb, tesla-v100-32gb\)"):
        get_card("v100")
    assert get_card("V100 32GB").id == "tesla-v100-32gb"


def test_short_keys_and_family_members() -> None:
    assert get_card("RTX 3060").id == "rtx-3060-12gb"
    assert get_card("rtx 4060 ti").id == "rtx-4060-ti-16gb"
    assert get_card("A4000").id == "rtx-a4000"
    assert get_card("P100").id == "tesla-p100-16gb"
    for other in ("RTX 4060", "RTX 4060 Ti 8GB", "RTX 5060 Ti 8GB", "L40", "RTX 5080 Laptop"):
        with pytest.raises(UnknownCardError):
            get_card(other)


def test_detection_leaves_an_8_gb_3060_out_of_the_12_gb_row() -> None:
    def gpu(index: int, mib: int) -> GpuInfo:
        total = mib * MIB
        return GpuInfo(
            index=index,
            name="NVIDIA GeForce RTX 3060",
            memory_total_bytes=total,
            memory_free_bytes=total,
            memory_used_bytes=0,
            compute_capability=(8, 6),
        )

    matched = with_card_ids([gpu(0, 12288), gpu(1, 8192)])
    assert [g.card_id for g in matched] == ["rtx-3060-12gb", None]
