"""KV cache types, one table: the names llama.cpp and SGLang take and what one element costs.

llama.cpp's types are ggml types, so their ids and sizes come from the `gguf` package's own constants (no
hand-kept numbers); a quantized V cache needs flash attention. SGLang's `--kv-cache-dtype` values are listed
with the bytes of one element (`auto` keeps the model's 16-bit dtype).
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# llama.cpp's cache types, in the order of its own list (common/arg.cpp: kv_cache_types).
LLAMA_KV_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# SGLang's --kv-cache-dtype values edgeserve plans with, and the bytes of one element.
SGLANG_KV_TYPES: dict[str, float] = {"auto": 2.0, "fp8_e5m2": 1.0, "fp8_e4m3": 1.0}
_UNQUANTIZED = frozenset({"f32", "f16", "bf16"})


def _ggml(name: str) -> GGMLQuantizationType:
    if name not in LLAMA_KV_TYPES:
        raise ValueError(f"unknown llama.cpp KV cache type {name!r}; use one of {', '.join(LLAMA_KV_TYPES)}")
    return GGMLQuantizationType[name.upper()]


def kv_ggml_type(name: str) -> int:
    """llama.cpp's ggml type id (cparams.type_k / type_v)."""
    return int(_ggml(name).value)


def kv_element_bytes(name: str) -> float:
    """Bytes of one K or V element: llama.cpp's type (q8_0 = 34/32), or an SGLang dtype."""
    if name in SGLANG_KV_TYPES:
        return SGLANG_KV_TYPES[name]
    block, size = GGML_QUANT_SIZES[_ggml(name)]
    return size / block


def is_quantized_kv(name: str) -> bool:
    """A quantized llama.cpp cache type (q8_0, q4_0, ...)."""
    return name in LLAMA_KV_TYPES and name not in _UNQUANTIZED


def needs_flash_attn(kv_type: str) -> bool:
    """Whether llama.cpp runs this cache type only with flash attention: a quantized V cache (its context
    refuses to start otherwise). The one home of the rule: the engine's settings, the budget and the launch
    plan ask it."""
    return is_quantized_kv(kv_type)


def flash_attn_needed(kv_type: str) -> str:
    """The one wording of that rule; each caller adds the remedy in its own terms (flag, setting, key)."""
    return f"a {kv_type} V cache needs flash attention"
