"""Quantization levels (llama.cpp file types) and what a model weighs at a level not yet on disk.

`llama_ftype` values are llama.cpp's LLAMA_FTYPE_MOSTLY_* enum (include/llama.h), the number
llama-quantize and `llama_model_quantize` take. Quality order and the Llama-3-8B figures are the ones
llama-quantize prints for each type (tools/quantize/quantize.cpp: size and perplexity increase against F16
on Llama-3-8B).

`quantized_tensors()` mirrors llama.cpp's tensor type selection (src/llama-quant.cpp:
tensor_allows_quantization, llama_tensor_get_type_impl, tensor_type_fallback) for the levels below, without
an importance matrix and without user overrides, so the estimate is the file llama-quantize would write.
"""

from __future__ import annotations

from collections.abc import Sequence

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from pydantic import BaseModel, ConfigDict, Field

from quantize.model_spec import OUTPUT, TOKEN_EMBD, ModelSpec, TensorInfo

__all__ = [
    "LEVELS",
    "QuantLevel",
    "UnknownLevelError",
    "estimate_weights_bytes",
    "get_level",
    "level_for_ftype",
    "level_names",
    "quantized_tensors",
    "spec_at_level",
    "tensor_bytes",
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


# ---- llama.cpp's per-tensor type selection (src/llama-quant.cpp)
# ------------------------------------------------

_NOT_QUANTIZED_PARTS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
)
_NOT_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")
# tensor_type_fallback: a row length the block size does not divide falls back to a 32-block type
_FALLBACK = {
    "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def _block(type_name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]


def _is_quantized_type(type_name: str) -> bool:
    return type_name not in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def tensor_bytes(shape: Sequence[int], type_name: str) -> int:
    """ggml_nbytes for a contiguous tensor: rows * ggml_row_size(type, ne0)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rows = 1
    for d in shape[1:]:
        rows *= d
    return rows * (shape[0] // block) * size


def _allows_quantization(t: TensorInfo) -> bool:
    if t.n_dims < 2 or not t.name.endswith("weight"):
        return False
    if t.name in _NOT_QUANTIZED_NAMES:
        return False
    return not any(part in t.name for part in _NOT_QUANTIZED_PARTS)


def _category(name: str) -> str:
    if name == OUTPUT:
        return "output"
    if name in (TOKEN_EMBD, "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if part in name:
            return cat
    return "other"


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class _State:
    def __init__(self, spec: ModelSpec) -> None:
        cats = [_category(t.name) for t in spec.tensors]
        self.n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
        self.has_tied_embeddings = "output" not in cats
        self.n_layer = spec.n_layer
        self.i_attention_wv = 0
        self.i_ffn_down = 0
        self.i_ffn_gate = 0
        self.i_ffn_up = 0


def _impl_type(st: _State, spec: ModelSpec, t: TensorInfo, new: str, ftype: str, cat: str) -> str:
    """llama_tensor_get_type_impl, restricted to the k-quant / legacy / IQ4_XS file types of LEVELS."""
    arch = spec.architecture
    n_gqa = spec.n_gqa
    n_expert = spec.n_expert
    is_70b = arch == "llama" and spec.n_layer == 80 and spec.n_head != spec.n_head_kv[0]

    def layer_of(counter: int) -> int:
        if n_expert > 1 and t.layer is not None:
            return t.layer
        return counter

    if cat == "output" or (st.has_tied_embeddings and cat == "token_embd"):
        if arch == "falcon" or t.shape[0] % _block(new) != 0:
            return "Q8_0"
        return "Q6_K" if new != "Q8_0" else new
    if cat == "token_embd":
        return new
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        i, n = st.i_attention_wv, st.n_attention_wv
        if ftype == "Q2_K":
            new = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L" or (ftype == "IQ4_XS" and n_gqa >= 4):
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if n_expert == 8:
            new = "Q8_0"
        st.i_attention_wv += 1
        return new
    if cat == "attn_k":
        return "Q8_0" if n_expert == 8 else new
    if cat == "ffn_down":
        i, n = layer_of(st.i_ffn_down), st.n_layer
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else ("Q4_K" if arch != "falcon" or _use_more_bits(i, n) else "Q3_K")
        elif ftype == "Q3_K_L":
            new = "Q4_K" if arch == "falcon" else "Q5_K"
        elif ftype == "Q4_K_M":
            if arch == "falcon":
                new = "Q6_K" if i < n // 16 else ("Q5_K" if _use_more_bits(i, n) else "Q4_K")
            elif _use_more_bits(i, n):
                new = "Q6_K"
        elif i < n // 8 and ftype == "IQ4_XS":
            new = "Q5_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and arch != "falcon" and i < n // 8:
            new = "Q5_K"
        st.i_ffn_down += 1
        return new
    if cat == "attn_output":
        if arch != "falcon":
            if n_expert == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    new = "Q5_K"
            elif ftype == "Q2_K":
                new = "Q3_K"
            elif ftype == "Q3_K_M":
                new = "Q4_K"
            elif ftype == "Q3_K_L":
                new = "Q5_K"
        elif ftype == "Q3_K_L":
            new = "Q4_K"
        return new
    if cat == "ffn_gate":
        st.i_ffn_gate += 1
    elif cat == "ffn_up":
        st.i_ffn_up += 1
    return new


def _fallback(t: TensorInfo, new: str) -> str:
    ncols = t.shape[0]
    if ncols % _block(new) == 0:
        return new
    ret = _FALLBACK.get(new, new)
    if ncols % _block(ret) != 0:
        ret = "F16"
    return ret


def quantized_tensors(spec: ModelSpec, level: str | QuantLevel) -> tuple[TensorInfo, ...]:
    """The tensors of `spec` as llama-quantize would write them at `level` (no imatrix, no overrides), in the
    order llama-quantize writes them."""
    lv = get_level(level)
    st = _State(spec)
    out: list[TensorInfo] = []
    # llama.cpp walks the weights ordered by layer (globals first), then by name (weight_name_comparer); the
    # attn_v / ffn_down counters depend on that order.
    for t in sorted(spec.tensors, key=lambda t: (-1 if t.layer is None else t.layer, t.name)):
        if not _allows_quantization(t):
            out.append(t)
            continue
        new = lv.base_type
        if _is_quantized_type(new):
            new = _impl_type(st, spec, t, new, lv.name, _category(t.name))
            new = _fallback(t, new)
        out.append(TensorInfo(name=t.name, shape=t.shape, ggml_type=new, n_bytes=tensor_bytes(t.shape, new)))
    return tuple(out)


def spec_at_level(spec: ModelSpec, level: str | QuantLevel) -> ModelSpec:
    """The same model with its tensors re-typed for `level` (a file not yet on disk)."""
    lv = get_level(level)
    return spec.model_copy(
        update={
            "tensors": quantized_tensors(spec, lv),
            "file_type": lv.llama_ftype,
            "file_type_name": lv.name,
        }
    )


def estimate_weights_bytes(spec: ModelSpec, level: str | QuantLevel) -> int:
    """Bytes of all tensors of `spec` quantized to `level`."""
    return sum(t.n_bytes for t in quantized_tensors(spec, level))
