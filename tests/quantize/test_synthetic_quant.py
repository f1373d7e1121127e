"""quantize.synthetic_quant: a quantized synthetic GGUF written directly is the file llama-quantize would
write (tensor for tensor: type, shape and bytes), and llama.cpp runs it with finite logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from quantize.llama_session import LlamaSession
from quantize.model.gguf_file import read_model_spec
from quantize.model.levels import get_level
from quantize.runner import QuantizeJob, run_llama_quantize
from quantize.synthetic import TINY, write_synthetic_gguf
from quantize.synthetic_quant import write_quantized_synthetic

# 16 layers: Q4_K_M gives some layers' attn_v and ffn_down Q6_K (llama.cpp's use_more_bits), which two
# layers would not show; tied embeddings make token_embd the output (Q6_K).
DEEP = dataclasses.replace(TINY, n_layer=16)
DEEP_TIED = dataclasses.replace(TINY, n_layer=9, tie_embeddings=True)


def _tensors(path: Path) -> list[tuple[str, tuple[int, ...], str, int]]:
    spec = read_model_spec(path)
    return sorted((t.name, t.shape, t.ggml_type, t.n_bytes) for t in spec.tensors)


@pytest.mark.parametrize(("shape", "level"), [(DEEP, "Q4_K_M"), (DEEP_TIED, "Q4_K_M"), (TINY, "Q8_0")],
                         ids=["q4_k_m", "q4_k_m-tied", "q8_0"])
def test_direct_file_is_the_file_llama_quantize_writes(tmp_path: Path, shape: object, level: str) -> None:
    assert isinstance(shape, type(TINY))
    f16 = write_synthetic_gguf(tmp_path / "f16.gguf", shape, seed=3)
    by_llama = tmp_path / "by-llama.gguf"
    run_llama_quantize(QuantizeJob(src=str(f16), dst=str(by_llama), ftype=get_level(level).llama_ftype))
    direct = write_quantized_synthetic(tmp_path / "direct.gguf", shape, level=level, seed=3)
    assert _tensors(direct) == _tensors(by_llama)
    assert read_model_spec(direct).file_type == read_model_spec(by_llama).file_type
    # Only metadata may differ in size (llama-quantize adds a few keys of its own).
    assert abs(direct.stat().st_size - by_llama.stat().st_size) < 64 * 1024


def test_llama_cpp_runs_it_with_small_finite_logits(tmp_path: Path) -> None:
    path = write_quantized_synthetic(tmp_path / "deep-Q4_K_M.gguf", DEEP, level="Q4_K_M")
    with LlamaSession(path, n_ctx=64) as session:
        tokens = session.tokenize("The quick brown fox jumps over the lazy dog")
        logits = session.decode(tokens, 0, 0)
        run = session.greedy("Once upon a time", 6, stop_at_eog=False)
    assert np.all(np.isfinite(logits))
    assert 0.01 < float(logits.std()) < 10.0
    assert len(run.tokens) == 6


def test_levels_with_types_it_cannot_write_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Q3_K_M uses Q3_K, not written here"):
        write_quantized_synthetic(tmp_path / "x.gguf", TINY, level="Q3_K_M")
    assert not (tmp_path / "x.gguf").exists()
