"""What a model weighs at a quantization level not yet on disk: llama.cpp's per-tensor type choice.

`quantized_tensors()` mirrors llama.cpp's tensor type selection (src/llama-quant.cpp:
tensor_allows_quantization, llama_tensor_get_type_impl, tensor_type_fallback) for the levels of
quantize/levels.py, without an importance matrix and without user overrides, so the estimate is the file
llama-quantize would write.
"""

from __future__ import annotations

from collections.abc import Sequence

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from quantize.model.levels import QuantLevel, get_level
from quantize.model.spec import OUTPUT, TOKEN_EMBD, ModelSpec, TensorInfo

__all__ = ["estimate_weights_bytes", "quantized_tensors", "spec_at_level", "tensor_bytes"]


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
