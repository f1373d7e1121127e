"""Card tables: what each supported NVIDIA card is, and what the serving stack may use on it.

The rows are data, `cards.yaml` and `cards_small.yaml` beside this module (package data, read with
importlib.resources), every figure with the URL it comes from; this module holds the model, the capability
rules and the name matching (an id, a marketing name, or whatever string NVML reports for the device).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantize.model.units import GIB, MIB
from server.hardware.cuda_toolkit import CudaToolkitRange, cuda_toolkit_for

# Read in this order; the second holds the cards people run small (Pascal/Volta bought used, GeForce, RTX A).
CARD_TABLES: tuple[str, ...] = ("cards.yaml", "cards_small.yaml")
# The table writes sizes in the unit of its source: `memory_gib: 8` is `memory_bytes` = 8 GiB.
_UNIT_SUFFIXES = {"_gib": GIB, "_mib": MIB}
SGLANG_MIN_CC = (8, 0)

Architecture = Literal[
    "Pascal", "Volta", "Turing", "Ampere", "Ada Lovelace", "Hopper", "Blackwell", "unknown"
]

# Spec fields a table row must cite (`sources[field]`) wherever it gives them; capabilities derive from them.
SOURCED_FIELDS: tuple[str, ...] = (
    "compute_capability",
    "sm_count",
    "cuda_cores",
    "memory_bytes",
    "nvml_memory_bytes",
    "bandwidth_gbps",
    "tdp_w",
    "tensor_core_gen",
    "fp16_to_fp32_ratio",
    "pcie_gen",
    "has_nvlink",
)


class UnknownCardError(ValueError):
    """A card key matched no row (or several); the message lists the known ids."""


class Card(BaseModel):
    """One GPU model: its hardware figures (each with a source) and derived serving capabilities.

    `memory_bytes` is the nominal size (the datasheet's GB are GiB for GPU memory); the total NVML reports
    is a little lower (ECC, driver reservations): `nvml_memory_bytes` where a source gives it, and
    detection's own figure where a real device is present. Rows built from NVML for a card missing from
    the table (`is_from_table=False`) leave unknown figures as None.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    names: tuple[str, ...] = Field(
        min_length=1, description="marketing names as NVML reports them; first is canonical"
    )
    architecture: Architecture
    chip: str | None
    compute_capability: tuple[int, int]
    sm_count: int | None = Field(default=None, gt=0)
    cuda_cores: int | None = Field(default=None, gt=0)
    memory_bytes: int = Field(gt=0, description="nominal size: the datasheet's GB, which are GiB")
    nvml_memory_bytes: int | None = Field(
        default=None,
        gt=0,
        description="total NVML/nvidia-smi reports with default settings (ECC on where it exists)",
    )
    memory_type: str | None
    bandwidth_gbps: float | None = Field(
        default=None, gt=0, description="memory bandwidth, GB/s (10^9 bytes/s)"
    )
    tdp_w: int | None = Field(default=None, gt=0, description="board power / TDP of the variant described")
    tensor_core_gen: int | None = Field(default=None, ge=1, description="None: no tensor cores")
    fp16_to_fp32_ratio: float | None = Field(
        default=None, gt=0, description="non-tensor FP16 throughput relative to FP32 (P4: 1/64)"
    )
    pcie_gen: int | None = Field(default=None, ge=1)
    pcie_lanes: int = Field(default=16, ge=1, description="lanes the card's connector uses (x8 on some)")
    has_nvlink: bool | None = Field(default=False, description="None: no source says either way")
    variant: str = Field(
        default="", description="which form factor the figures describe, where several exist"
    )
    notes: str = ""
    unsourced: tuple[str, ...] = Field(
        default=(), description="figures left None because no source for them was found"
    )
    is_from_table: bool = True
    sources: Mapping[str, str] = Field(default_factory=dict, description="field -> URL the figure comes from")

    @model_validator(mode="after")
    def _check_sources(self) -> Card:
        if self.is_from_table:
            # A None figure needs no source, except tensor_core_gen: None there claims no tensor cores.
            missing = [
                f
                for f in SOURCED_FIELDS
                if f not in self.sources and (getattr(self, f) is not None or f == "tensor_core_gen")
            ]
            if missing:
                raise ValueError(f"card {self.id}: no source for {', '.join(missing)}")
        unknown = [k for k in self.sources if k not in type(self).model_fields]
        if unknown:
            raise ValueError(f"card {self.id}: sources name unknown fields {unknown}")
        # An unsourced figure stays unknown; tensor_core_gen cannot be (None there means "no tensor cores").
        bad = [
            f
            for f in self.unsourced
            if f not in SOURCED_FIELDS or f == "tensor_core_gen" or getattr(self, f) is not None
        ]
        if bad:
            raise ValueError(f"card {self.id}: unsourced lists {bad}, which are not unknown figures")
        return self

    def __hash__(self) -> int:  # `sources` is a mapping; the id identifies a row
        return hash((self.id, self.memory_bytes, self.compute_capability))

    # --- hardware predicates -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The canonical marketing name."""
        return self.names[0]

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    @property
    def usable_memory_bytes(self) -> int:
        """What the driver offers (NVML's total) where known, else the nominal size."""
        return self.nvml_memory_bytes or self.memory_bytes

    @property
    def has_tensor_cores(self) -> bool:
        return self.tensor_core_gen is not None

    @property
    def has_fast_fp16(self) -> bool:
        """FP16 at least as fast as FP32 (not so on Pascal GP104, where it runs at 1:64)."""
        if self.fp16_to_fp32_ratio is None:
            return self.compute_capability >= (7, 0)
        return self.fp16_to_fp32_ratio >= 1.0

    @property
    def has_int8_dp4a(self) -> bool:
        """The dp4a instruction (CC >= 6.1); llama.cpp's MMQ kernels use it (GGML_CUDA_CC_DP4A = 610)."""
        return self.compute_capability >= (6, 1)

    @property
    def has_fp8(self) -> bool:
        """Hardware FP8 tensor math: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)."""
        return self.compute_capability >= (8, 9)

    @property
    def cuda_toolkit(self) -> CudaToolkitRange | None:
        """The CUDA toolkits llama.cpp can be built with for this card (CUDA 12.x only on Pascal and Volta,
        12.8+ on Blackwell); None where the compute capability is unknown (an NVML row without one)."""
        if self.compute_capability == (0, 0):
            return None
        return cuda_toolkit_for(self.compute_capability)

    # --- what the serving stack may use --------------------------------------------------------------------

    @property
    def can_run_sglang(self) -> bool:
        """SGLang as shipped needs SM80+ (Ampere or newer).

        SGLang once set its floor at SM75 (sgl-project/sglang#1062), then announced the end of SM75
        (sgl-project/sglang#6006); current builds fail on a T4 with "no kernel image is available"
        (sgl-project/sglang#24224) and gpustack gates SGLang to SM80+ (gpustack/gpustack#3932). So the T4
        (SM75) and the P4 (SM61) serve through llama.cpp only.
        """
        return self.compute_capability >= SGLANG_MIN_CC

    @property
    def has_flash_attn_kernels(self) -> bool:
        """llama.cpp's own CUDA flash attention (tile/vec/mma kernels) runs on every card from Pascal on."""
        return self.compute_capability >= (6, 0)

    @property
    def has_flash_attn2_library(self) -> bool:
        """The FlashAttention-2 library needs SM80+ (Ampere, Ada, Hopper)."""
        return self.compute_capability >= (8, 0)

    @property
    def has_flash_attn3_library(self) -> bool:
        """FlashAttention-3 targets Hopper (SM90) only."""
        return self.compute_capability[0] == 9

    @property
    def can_fp8_kv(self) -> bool:
        """SGLang `--kv-cache-dtype fp8_e4m3/fp8_e5m2` where FP8 is in hardware (SM89+) and SGLang runs.

        SGLang also stores an FP8 cache on Ampere, but without fused dequantization its docs warn attention
        "can be extremely slow" (docs/advanced_features/quantized_kv_cache.md), so we plan FP8 KV only where
        the conversion is native.
        """
        return self.can_run_sglang and self.has_fp8


class Link(BaseModel):
    """How the GPUs of a set talk to each other."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pcie_gen: int | None = Field(default=None, ge=1)
    has_nvlink: bool = False


class GpuSet(BaseModel):
    """`count` identical cards joined by `link`: `--gpus 2` on rtx-5090 is the 5090 pair.

    `measured_memory_bytes` is NVML's total per GPU when the set was detected on real hardware.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    card: Card
    count: int = Field(default=1, ge=1)
    link: Link = Field(default_factory=Link)
    measured_memory_bytes: int | None = Field(default=None, gt=0)

    @classmethod
    def of(cls, card: Card, count: int = 1, *, has_nvlink: bool | None = None) -> GpuSet:
        """A set of `count` cards on the card's own PCIe generation; NVLink only if asked and the card has it.

        NVLink defaults to off: bridges (RTX 3090, PCIe A100/H100) are optional, so assuming one would be
        optimistic; SXM parts pass has_nvlink=True.
        """
        nvlink = bool(has_nvlink) and card.has_nvlink is True and count > 1
        return cls(card=card, count=count, link=Link(pcie_gen=card.pcie_gen, has_nvlink=nvlink))

    @property
    def card_id(self) -> str:
        return self.card.id

    @property
    def memory_bytes_per_gpu(self) -> int:
        """Memory a backend can have on each GPU: measured if detected, else the card's usable figure."""
        return self.measured_memory_bytes or self.card.usable_memory_bytes

    @property
    def nominal_memory_bytes_per_gpu(self) -> int:
        return self.card.memory_bytes

    @property
    def total_memory_bytes(self) -> int:
        return self.memory_bytes_per_gpu * self.count

    @property
    def label(self) -> str:
        return self.card.id if self.count == 1 else f"{self.count}x {self.card.id}"


# --- lookup ------------------------------------------------------------------------------------------------

# Words NVML and people put around the model number that say nothing about which card it is.
_NOISE_TOKENS = frozenset({"nvidia", "geforce", "tesla", "rtx", "gpu", "graphics"})
# Words naming another card of the same family (RTX 3090 Ti, RTX 4090 D, H100 NVL 94 GB, laptop parts).
_VARIANT_TOKENS = frozenset({"ti", "super", "d", "laptop", "mobile", "maxq", "nvl", "ada"})
_MEMORY_TOKEN = re.compile(r"^(\d+)gb$")
# A part whose memory differs from the row by more than this is some other card.
_MEMORY_TOLERANCE = 0.12


def _normalize(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", key.lower()).strip()


def _tokens(key: str) -> list[str]:
    text = _normalize(key).replace("max q", "maxq")
    return [t for t in text.split() if t not in _NOISE_TOKENS]


def _model_tokens(card: Card) -> tuple[str, ...]:
    """The tokens that name the card's model, from its id: ('p4',), ('4060', 'ti'), ('a100',), ('l40s',).

    The family prefix ('tesla', 'rtx') and a trailing memory size ('16gb') are not part of the model: memory
    is told apart by the key's own size token or by NVML's total.
    """
    parts = card.id.split("-")
    if parts[0] in {"tesla", "rtx"} and len(parts) > 1:
        parts = parts[1:]
    if len(parts) > 1 and _MEMORY_TOKEN.match(parts[-1]):
        parts = parts[:-1]
    return tuple(parts)


def _memory_ok(card: Card, memory_bytes: int | None) -> bool:
    if memory_bytes is None:
        return True
    return abs(memory_bytes - card.memory_bytes) <= _MEMORY_TOLERANCE * card.memory_bytes


def _in_bytes(key: str) -> tuple[str, int]:
    for suffix, unit in _UNIT_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)] + "_bytes", unit
    return key, 1


def card_from_row(row: Mapping[str, Any]) -> Card:
    """One row of the table (sizes in GiB/MiB where the key says so) as a Card."""
    values: dict[str, Any] = {}
    for key, value in row.items():
        if key == "sources":
            values["sources"] = {_in_bytes(k)[0]: url for k, url in value.items()}
            continue
        name, unit = _in_bytes(key)
        values[name] = round(value * unit) if unit != 1 else value
    return Card.model_validate(values)


@cache
def _table() -> tuple[Card, ...]:
    package = resources.files(__package__)
    cards = tuple(
        card_from_row(row)
        for name in CARD_TABLES
        for row in yaml.safe_load(package.joinpath(name).read_text(encoding="utf-8"))["cards"]
    )
    ids = [c.id for c in cards]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"duplicate card ids in the table: {ids}")
    return cards


def all_cards() -> tuple[Card, ...]:
    """Every card row, in table order (cards.yaml, then cards_small.yaml)."""
    return _table()


def card_ids() -> tuple[str, ...]:
    """The ids of every card row, in table order."""
    return tuple(c.id for c in _table())


def _fuzzy_candidates(key: str, cards: Iterable[Card]) -> list[Card]:
    """Rows whose model tokens all appear in the key, where the key names no other variant (a 'Ti', 'D',
    'Laptop' the row does not have) and no other memory size."""
    tokens = _tokens(key)
    if not tokens:
        return []
    mem_tokens = [int(m.group(1)) for t in tokens if (m := _MEMORY_TOKEN.match(t))]
    found = []
    for card in cards:
        model = _model_tokens(card)
        if not set(model) <= set(tokens):
            continue
        if any(t in _VARIANT_TOKENS and t not in model for t in tokens):
            continue
        if mem_tokens and round(card.memory_gib) not in mem_tokens:
            continue
        found.append(card)
    return found


def match_card(nvml_name: str, memory_bytes: int | None = None) -> Card | None:
    """The table row for a device name as NVML reports it, or None for a card not in the table.

    `memory_bytes` (NVML's total) tells the A100 40 GB from the 80 GB and rejects same-named parts of
    another size.
    """
    cards = _table()
    norm = _normalize(nvml_name)
    if not norm:
        return None
    exact = [c for c in cards if norm == c.id.replace("-", " ") or norm in {_normalize(n) for n in c.names}]
    candidates = exact or _fuzzy_candidates(nvml_name, cards)
    candidates = [c for c in candidates if _memory_ok(c, memory_bytes)]
    if len(candidates) > 1 and memory_bytes is not None:
        candidates = [min(candidates, key=lambda c: abs(c.memory_bytes - memory_bytes))]
    return candidates[0] if len(candidates) == 1 else None


def get_card(key: str) -> Card:
    """The card for an id or marketing name (case-insensitive, NVML spellings accepted).

    Raises UnknownCardError, listing the known ids, when nothing (or more than one row) matches.
    """
    card = match_card(key)
    if card is not None:
        return card
    several = _fuzzy_candidates(key, _table())
    known = ", ".join(card_ids())
    if len(several) > 1:
        which = ", ".join(c.id for c in several)
        raise UnknownCardError(f"card {key!r} is ambiguous ({which}); known ids: {known}")
    raise UnknownCardError(f"unknown card {key!r}; known ids: {known}")
