"""Quantization levels: llama.cpp's file types, their bits per weight and quality order.

`llama_ftype` values are llama.cpp's LLAMA_FTYPE_MOSTLY_* enum (include/llama.h), the number
llama-quantize and `llama_model_quantize` take. Quality order and the Llama-3-8B figures are the ones
llama-quantize prints for each type (tools/quantize/quantize.cpp: size and perplexity increase against F16
on Llama-3-8B).

What a model weighs at a level not yet on disk (llama.cpp's per-tensor type choice): quantize/tensor_types.py.
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "LEVELS",
    "QuantLevel",
    "UnknownLevelError",
    "get_level",
    "level_for_ftype",
    "level_names",
]


class QuantLevel(BaseModel):
    """One llama.cpp quantization file type."""

    model_config = ConfigDict(frozen=True)

    name: str
    llama_ftype: int = Field(description="LLAMA_FTYPE_MOSTLY_* value")
    base_type: str = Field(description="ggml type of most 2-D weights (llama_ftype_get_default_type)")
    bits_per_weight: float = Field(gt=0, description="nominal bits per weight of base_type")
    quality_rank: int = Field(description="higher is better; ordered by perplexity increase on Llama-3-8B")
    ppl_increase_llama3_8b: float | None = Field(default=None, description="from llama-quantize's table")
    size_gb_llama3_8b: float | None = None
    mix: str = ""

    @property
    def is_quantized(self) -> bool:
        return self.base_type not in ("F32", "F16", "BF16")


def _bpw(type_name: str) -> float:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return 8.0 * size / block


def _level(
    name: str, ftype: int, base: str, rank: int, ppl: float | None, gb: float | None, mix: str
) -> QuantLevel:
    return QuantLevel(
        name=name,
        llama_ftype=ftype,
        base_type=base,
        bits_per_weight=_bpw(base),
        quality_rank=rank,
        ppl_increase_llama3_8b=ppl,
        size_gb_llama3_8b=gb,
        mix=mix,
    )


# Highest quality first.
LEVELS: tuple[QuantLevel, ...] = (
    _level("F16", 1, "F16", 100, None, 16.1, "all 2-D weights F16, 1-D F32"),
    _level("Q8_0", 7, "Q8_0", 90, 0.0026, 7.96, "all 2-D weights Q8_0"),
    _level("Q6_K", 18, "Q6_K", 80, 0.0217, 6.14, "all 2-D weights Q6_K"),
    _level(
        "Q5_K_M",
        17,
        "Q5_K",
        70,
        0.0569,
        5.33,
        "Q5_K; attn_v and ffn_down Q6_K in about half the layers (use_more_bits); output Q6_K",
    ),
    _level("Q5_K_S", 16, "Q5_K", 65, 0.1049, 5.21, "Q5_K; output Q6_K"),
    _level(
        "Q4_K_M",
        15,
        "Q4_K",
        60,
        0.1754,
        4.58,
        "Q4_K; attn_v and ffn_down Q6_K in about half the layers (use_more_bits); output Q6_K",
    ),
    _level(
        "Q4_K_S",
        14,
        "Q4_K",
        55,
        0.2689,
        4.37,
        "Q4_K; first 4 attn_v and first 1/8 ffn_down Q5_K; output Q6_K",
    ),
    _level(
        "IQ4_XS",
        30,
        "IQ4_XS",
        52,
        None,
        None,
        "IQ4_XS; attn_v Q5_K when n_gqa >= 4, first 1/8 ffn_down Q5_K; output Q6_K",
    ),
    _level("Q4_0", 2, "Q4_0", 50, 0.4685, 4.34, "Q4_0; output Q6_K"),
    _level("Q3_K_L", 13, "Q3_K", 45, 0.5562, 4.03, "Q3_K; attn_v, attn_output, ffn_down Q5_K; output Q6_K"),
    _level(
        "Q3_K_M",
        12,
        "Q3_K",
        40,
        0.6569,
        3.74,
        "Q3_K; attn_v Q5_K (first 2) / Q4_K, attn_output Q4_K, ffn_down Q5_K (first 1/16) / Q4_K; "
        "output Q6_K",
    ),
    _level("Q3_K_S", 11, "Q3_K", 35, 1.6321, 3.41, "Q3_K; output Q6_K"),
    _level(
        "Q2_K",
        10,
        "Q2_K",
        20,
        3.5199,
        2.96,
        "Q2_K; attn_v Q4_K (n_gqa >= 4) / Q3_K, attn_output and ffn_down Q3_K; output Q6_K",
    ),
)

_BY_NAME = {lv.name.upper(): lv for lv in LEVELS}
# llama-quantize's aliases
_ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}


class UnknownLevelError(ValueError):
    """The quantization level is not one edgeserve knows; the message lists the supported ones."""


def level_names() -> list[str]:
    return [lv.name for lv in LEVELS]


def get_level(name: str | QuantLevel) -> QuantLevel:
    """Level by name, case-insensitive (Q4_K_M, q4_k_m; llama-quantize's aliases Q4_K/Q5_K/Q3_K too)."""
    if isinstance(name, QuantLevel):
        return name
    key = name.strip().upper().replace("-", "_")
    key = _ALIASES.get(key, key)
    try:
        return _BY_NAME[key]
    except KeyError:
        raise UnknownLevelError(
            f"unknown quantization level {name!r}; supported: {', '.join(level_names())}"
        ) from None


def level_for_ftype(ftype: int | None) -> QuantLevel | None:
    """The level whose llama_ftype matches a GGUF's general.file_type, if edgeserve lists it."""
    return next((lv for lv in LEVELS if lv.llama_ftype == ftype), None)
