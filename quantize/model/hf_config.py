"""ModelSpec from a Hugging Face `config.json` (SGLang serves safetensors checkpoints, not GGUF).

The weights are estimated from the shapes and the checkpoint dtype: the tensor list is written with GGUF
tensor names (token_embd, blk.N.attn_q, ...) so the same calculator and level estimates work on it.
Multimodal configs (Gemma 3 and others keep the language model under `text_config`) are read from their
text part; vision towers are not counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quantize.model.gguf_file import GGUFReadError, swa_layer_pattern
from quantize.model.spec import ModelSpec, TensorInfo

__all__ = ["HFConfigError", "model_spec_from_hf_config"]

# (label, bytes per weight) of the linear layers by checkpoint dtype / quantization method
_DTYPES: dict[str, tuple[str, float]] = {
    "bfloat16": ("BF16", 2.0),
    "float16": ("F16", 2.0),
    "half": ("F16", 2.0),
    "float32": ("F32", 4.0),
    "float": ("F32", 4.0),
}
# HF model_type -> the architecture name llama.cpp / GGUF uses
_ARCH = {
    "mistral": "llama",
    "llama": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "gpt_oss": "gpt-oss",
    "cohere2": "cohere2",
}


class HFConfigError(GGUFReadError):
    """config.json is missing, not JSON, or lacks a field the calculator needs; the message names the file."""


def _load(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise HFConfigError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFConfigError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(data, dict):
        raise HFConfigError(f"{path}: the JSON is not an object")
    return data


def _linear_dtype(cfg: dict[str, Any], text: dict[str, Any]) -> tuple[str, float]:
    q = cfg.get("quantization_config") or text.get("quantization_config")
    if isinstance(q, dict):
        method = str(q.get("quant_method", "")).lower()
        bits = q.get("bits") or q.get("w_bit")
        if method == "fp8":
            return "FP8", 1.0
        if isinstance(bits, int) and bits > 0:
            group = int(q.get("group_size") or q.get("q_group_size") or 128)
            # packed weights + one f16 scale and zero per group
            return f"INT{bits}", bits / 8 + 4 / max(group, 1)
    name = str(
        text.get("torch_dtype")
        or text.get("dtype")
        or cfg.get("torch_dtype")
        or cfg.get("dtype")
        or "bfloat16"
    ).lower()
    return _DTYPES.get(name, ("BF16", 2.0))


def _get(text: dict[str, Any], path: Path, *names: str, default: Any = None) -> Any:
    for n in names:
        if text.get(n) is not None:
            return text[n]
    if default is not None:
        return default
    raise HFConfigError(f"{path}: config has none of {', '.join(names)}")


def _swa(text: dict[str, Any], arch: str, n_layer: int) -> tuple[int, tuple[bool, ...]]:
    window = text.get("sliding_window")
    if not window or text.get("use_sliding_window") is False:
        return 0, ()
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == n_layer:
        layers = tuple(t == "sliding_attention" for t in layer_types)
    elif text.get("sliding_window_pattern"):
        layers = swa_layer_pattern(n_layer, int(text["sliding_window_pattern"]))
    elif arch == "gemma3":
        layers = swa_layer_pattern(n_layer, 6)
    elif arch in ("gemma2", "gpt-oss"):
        layers = swa_layer_pattern(n_layer, 2)
    else:
        # e.g. Mistral v0.1: every layer uses the window
        layers = (True,) * n_layer
    return (int(window), layers) if any(layers) else (0, ())


def model_spec_from_hf_config(path: str | os.PathLike[str]) -> ModelSpec:
    """Spec of a Hugging Face checkpoint from its config.json (a file or the folder holding it)."""
    p = Path(path)
    cfg = _load(p)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    assert isinstance(text, dict)
    model_type = str(text.get("model_type") or cfg.get("model_type") or "llama")
    arch = _ARCH.get(model_type, model_type)

    n_layer = int(_get(text, p, "num_hidden_layers", "n_layer", "num_layers"))
    n_embd = int(_get(text, p, "hidden_size", "n_embd", "d_model"))
    n_head = int(_get(text, p, "num_attention_heads", "n_head"))
    n_head_kv = int(_get(text, p, "num_key_value_heads", "n_head_kv", default=n_head))
    head_dim = int(text.get("head_dim") or n_embd // n_head)
    n_ff = int(_get(text, p, "intermediate_size", "ffn_dim", default=4 * n_embd))
    n_vocab = int(_get(text, p, "vocab_size"))
    n_ctx = int(text.get("max_position_embeddings") or 0)
    tied = bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    n_expert = int(text.get("num_local_experts") or text.get("num_experts") or 0)
    label, bpw_bytes = _linear_dtype(cfg, text)
    emb_label, emb_bytes = _DTYPES.get(
        str(text.get("torch_dtype") or cfg.get("torch_dtype") or "bfloat16").lower(), ("BF16", 2.0)
    )
    if n_layer <= 0 or n_embd <= 0 or n_head <= 0 or n_vocab <= 0:
        raise HFConfigError(f"{p}: non-positive dimensions in the config")

    q_out = n_head * head_dim
    kv_out = n_head_kv * head_dim

    def lin(name: str, ne0: int, ne1: int, n: int = 1) -> TensorInfo:
        shape = (ne0, ne1) if n == 1 else (ne0, ne1, n)
        return TensorInfo(name=name, shape=shape, ggml_type=label, n_bytes=int(ne0 * ne1 * n * bpw_bytes))

    def norm(name: str) -> TensorInfo:
        # checkpoints keep norms in the model dtype (GGUF converts them to F32)
        return TensorInfo(name=name, shape=(n_embd,), ggml_type=emb_label, n_bytes=int(n_embd * emb_bytes))

    tensors = [
        TensorInfo(
            name="token_embd.weight",
            shape=(n_embd, n_vocab),
            ggml_type=emb_label,
            n_bytes=int(n_embd * n_vocab * emb_bytes),
        )
    ]
    for i in range(n_layer):
        b = f"blk.{i}"
        tensors += [
            norm(f"{b}.attn_norm.weight"),
            lin(f"{b}.attn_q.weight", n_embd, q_out),
            lin(f"{b}.attn_k.weight", n_embd, kv_out),
            lin(f"{b}.attn_v.weight", n_embd, kv_out),
            lin(f"{b}.attn_output.weight", q_out, n_embd),
            norm(f"{b}.ffn_norm.weight"),
        ]
        if n_expert > 1:
            n_ff_exp = int(text.get("moe_intermediate_size") or n_ff)
            tensors += [
                lin(f"{b}.ffn_gate_exps.weight", n_embd, n_ff_exp, n_expert),
                lin(f"{b}.ffn_up_exps.weight", n_embd, n_ff_exp, n_expert),
                lin(f"{b}.ffn_down_exps.weight", n_ff_exp, n_embd, n_expert),
                TensorInfo(
                    name=f"{b}.ffn_gate_inp.weight",
                    shape=(n_embd, n_expert),
                    ggml_type="F32",
                    n_bytes=4 * n_embd * n_expert,
                ),
            ]
        else:
            tensors += [
                lin(f"{b}.ffn_gate.weight", n_embd, n_ff),
                lin(f"{b}.ffn_up.weight", n_embd, n_ff),
                lin(f"{b}.ffn_down.weight", n_ff, n_embd),
            ]
    tensors.append(norm("output_norm.weight"))
    if not tied:
        tensors.append(
            TensorInfo(
                name="output.weight",
                shape=(n_embd, n_vocab),
                ggml_type=emb_label,
                n_bytes=int(n_embd * n_vocab * emb_bytes),
            )
        )

    sliding_window, swa_layers = _swa(text, arch, n_layer)
    try:
        return ModelSpec(
            path=str(p),
            source="hf-config",
            architecture=arch,
            name=str(cfg.get("_name_or_path") or (p.parent.name if p.is_file() else p.name)),
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=(n_head_kv,) * n_layer,
            head_dim_k=head_dim,
            head_dim_v=head_dim,
            n_ff=n_ff,
            n_vocab=n_vocab,
            n_ctx_train=n_ctx,
            n_expert=n_expert,
            sliding_window=sliding_window,
            swa_layers=swa_layers,
            file_type=None,
            file_type_name=label,
            tensors=tuple(tensors),
            has_chat_template=False,
        )
    except ValueError as exc:
        raise HFConfigError(f"{p}: inconsistent config: {exc}") from exc
