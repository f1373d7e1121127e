"""A synthetic Gemma 3 270M: the gemma3 architecture with its shapes and a sliding window, random weights.

The real file is 240 MB; benchmarks and tests that need sliding-window attention (5 of every 6 layers keep a
512-token window in llama.cpp) write this one instead, with the tokenizer of any GGUF. llama.cpp loads it
(src/models/gemma3.cpp: per layer attn_q/k/v/output, attn_q_norm/k_norm, post_attention_norm,
ffn_gate/up/down, post_ffw_norm; the output is tied to token_embd).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from quantize.model.gguf_file import swa_layer_pattern
from quantize.model.spec import ModelSpec, TensorInfo

__all__ = ["GEMMA3_270M", "gemma3_like_spec", "write_gemma3_like"]

# Gemma 3 270M: 18 layers, 640 wide, 4 heads of 256 sharing 1 KV head, a 512-token window on 5 of every 6
# layers.
GEMMA3_270M = {"n_layer": 18, "n_embd": 640, "n_head": 4, "n_head_kv": 1, "head_dim": 256, "n_ff": 2048,
               "n_ctx_train": 32768, "sliding_window": 512}  # fmt: skip


def _gemma3_plan(n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and ggml shapes (ne0 first) of a gemma3 model with GEMMA3_270M's shapes."""
    h = GEMMA3_270M
    e, hd, ff, q, kv = (
        h["n_embd"],
        h["head_dim"],
        h["n_ff"],
        h["n_head"] * h["head_dim"],
        h["n_head_kv"] * h["head_dim"],
    )
    plan: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (e, n_vocab)),
        ("output_norm.weight", (e,)),
    ]
    for i in range(h["n_layer"]):
        b = f"blk.{i}"
        plan += [
            (f"{b}.attn_norm.weight", (e,)), (f"{b}.attn_q.weight", (e, q)), (f"{b}.attn_k.weight", (e, kv)),
            (f"{b}.attn_v.weight", (e, kv)), (f"{b}.attn_output.weight", (q, e)),
            (f"{b}.attn_q_norm.weight", (hd,)), (f"{b}.attn_k_norm.weight", (hd,)),
            (f"{b}.post_attention_norm.weight", (e,)), (f"{b}.ffn_norm.weight", (e,)),
            (f"{b}.ffn_gate.weight", (e, ff)), (f"{b}.ffn_up.weight", (e, ff)),
            (f"{b}.ffn_down.weight", (ff, e)),
            (f"{b}.post_ffw_norm.weight", (e,)),
        ]  # fmt: skip
    return plan


def gemma3_like_spec(n_vocab: int) -> ModelSpec:
    """The ModelSpec write_gemma3_like's file reads back as (for --dry-run)."""
    h = GEMMA3_270M
    tensors = tuple(
        TensorInfo(name=n, shape=sh, ggml_type="F16" if len(sh) > 1 else "F32",
                   n_bytes=(2 if len(sh) > 1 else 4) * (sh[0] * (sh[1] if len(sh) > 1 else 1)))
        for n, sh in _gemma3_plan(n_vocab)
    )  # fmt: skip
    return ModelSpec(
        architecture="gemma3", name="edgeserve synthetic gemma3-270m", n_layer=h["n_layer"],
        n_embd=h["n_embd"],
        n_head=h["n_head"], n_head_kv=(h["n_head_kv"],) * h["n_layer"], head_dim_k=h["head_dim"],
        head_dim_v=h["head_dim"], n_ff=h["n_ff"], n_vocab=n_vocab, n_ctx_train=h["n_ctx_train"],
        sliding_window=h["sliding_window"], swa_layers=swa_layer_pattern(h["n_layer"], 6), file_type=1,
        file_type_name="F16", tensors=tensors,
    )  # fmt: skip


def write_gemma3_like(path: Path, vocab_from: Path, seed: int = 0) -> Path:
    """A gemma3-architecture GGUF with Gemma 3 270M's shapes and random F16 weights (llama.cpp loads it)."""
    h = GEMMA3_270M
    reader = gguf.GGUFReader(vocab_from)
    tok = [(f.name, f.contents(), f.types) for f in reader.fields.values() if f.name.startswith("tokenizer.")]
    n_vocab = len(next(v for k, v, _ in tok if k == "tokenizer.ggml.tokens"))
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_name("edgeserve synthetic gemma3-270m")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    w.add_context_length(h["n_ctx_train"])
    w.add_embedding_length(h["n_embd"])
    w.add_block_count(h["n_layer"])
    w.add_feed_forward_length(h["n_ff"])
    w.add_head_count(h["n_head"])
    w.add_head_count_kv(h["n_head_kv"])
    w.add_key_length(h["head_dim"])
    w.add_value_length(h["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(h["sliding_window"])
    for key, value, types in tok:
        w.add_key_value(key, value, types[0], sub_type=types[-1] if len(types) > 1 else None)
    rng = np.random.default_rng(seed)
    for name, shape in _gemma3_plan(n_vocab):
        if len(shape) == 1:  # norms stay F32, as in every llama.cpp file type
            w.add_tensor(name, np.ones(shape[0], dtype=np.float32))
        else:  # numpy order is the reverse of ggml's
            data = rng.standard_normal((shape[1], shape[0]), dtype=np.float32) * np.float32(0.02)
            w.add_tensor(name, data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
