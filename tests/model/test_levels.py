"""Quantization levels, and the per-tensor mix estimate checked against real llama.cpp quantization."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import pytest

from quantize.bundled import smollm2_path
from quantize.model.gguf_file import read_model_spec
from quantize.model.levels import LEVELS, UnknownLevelError, get_level, level_for_ftype
from quantize.model.spec import ModelSpec
from quantize.model.tensor_types import estimate_weights_bytes, quantized_tensors, spec_at_level
from quantize.model.units import GIB
from quantize.synthetic import SyntheticShape, write_synthetic_gguf


def test_get_level_is_case_insensitive_with_aliases() -> None:
    assert get_level("q4_k_m").name == "Q4_K_M"
    assert get_level(" Q4_K ").name == "Q4_K_M"
    assert get_level("q5-k-s").name == "Q5_K_S"
    assert get_level(get_level("Q8_0")).name == "Q8_0"


def test_unknown_level_lists_the_supported_ones() -> None:
    with pytest.raises(UnknownLevelError) as exc:
        get_level("Q7_K")
    for name in ("F16", "Q8_0", "Q4_K_M", "IQ4_XS", "Q2_K"):
        assert name in str(exc.value)


def test_ftypes_match_llama_cpp_enum() -> None:
    for lv in LEVELS:
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{lv.name}") == lv.llama_ftype
        assert level_for_ftype(lv.llama_ftype) is lv


def test_levels_are_in_quality_order() -> None:
    ranks = [lv.quality_rank for lv in LEVELS]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) == len(ranks)
    names = {lv.name for lv in LEVELS}
    assert {
        "F16",
        "Q8_0",
        "Q6_K",
        "Q5_K_M",
        "Q5_K_S",
        "Q4_K_M",
        "Q4_K_S",
        "Q4_0",
        "IQ4_XS",
        "Q3_K_M",
        "Q3_K_S",
        "Q2_K",
    } <= names
    assert get_level("Q4_0").bits_per_weight == 4.5 and get_level("Q6_K").bits_per_weight == 6.5625


def _llama31_8b_spec(tmp_path: Path) -> ModelSpec:
    from quantize.model.hf_config import model_spec_from_hf_config

    cfg = tmp_path / "config.json"
    cfg.write_text(
        '{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,'
        ' "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}'
    )
    return model_spec_from_hf_config(cfg)


def test_llama31_8b_sizes_match_llama_quantize_table(tmp_path: Path) -> None:
    """llama-quantize's own table gives Llama-3-8B sizes in GiB ("4.58G" for Q4_K_M)."""
    spec = _llama31_8b_spec(tmp_path)
    for lv in LEVELS:
        if lv.size_gb_llama3_8b is None or lv.name == "F16":
            continue
        est = estimate_weights_bytes(spec, lv) / GIB
        assert est == pytest.approx(lv.size_gb_llama3_8b, abs=0.02), lv.name
    q4 = spec_at_level(spec, "Q4_K_M")
    assert q4.file_type_name == "Q4_K_M"
    assert 4.8 < q4.bits_per_weight < 4.95  # "Llama-3.1-8B Q4_K_M = 4.89 BPW"
    # the Q4_K_M mix: output Q6_K, attn_v and ffn_down Q6_K in the use_more_bits layers, the rest Q4_K
    types = {t.name: t.ggml_type for t in q4.tensors}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert [i for i in range(32) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"] == [
        0,
        1,
        2,
        3,
        6,
        9,
        12,
        15,
        18,
        21,
        24,
        27,
        28,
        29,
        30,
        31,
    ]
    assert types["blk.5.ffn_down.weight"] == "Q4_K" and types["blk.5.attn_norm.weight"] == "BF16"


def _silence_llama() -> None:
    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user: ctypes.c_void_p) -> None:
        pass

    _silence_llama.cb = quiet  # type: ignore[attr-defined]  # keep the callback alive
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))


def _restore_llama_log() -> None:
    from llama_cpp import _logger

    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.allow_requantize = True
    _silence_llama()
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        _restore_llama_log()
    assert rc == 0


@pytest.fixture(scope="module")
def synthetic_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16 layers so that use_more_bits picks a real pattern; rows of 256 so that K-quants apply without
    # fallback
    shape = SyntheticShape(n_layer=16, n_embd=256, n_head=4, n_head_kv=1, n_ff=512)
    return write_synthetic_gguf(tmp_path_factory.mktemp("levels") / "f16.gguf", shape)


@pytest.mark.slow
@pytest.mark.parametrize("level", ["Q4_K_M", "Q3_K_M"])
def test_mix_matches_real_quantization(synthetic_f16: Path, tmp_path: Path, level: str) -> None:
    spec = read_model_spec(synthetic_f16)
    out = tmp_path / f"{level}.gguf"
    _quantize(synthetic_f16, out, get_level(level).llama_ftype)
    real = read_model_spec(out)
    est = {t.name: t for t in quantized_tensors(spec, level)}
    assert {t.name: t.ggml_type for t in real.tensors} == {n: t.ggml_type for n, t in est.items()}
    assert real.weights_bytes == estimate_weights_bytes(spec, level)


@pytest.mark.slow
def test_bundled_model_at_q4_k_m_matches_real_requantization(tmp_path: Path) -> None:
    """SmolLM2 rows of 576 are no multiple of 256: llama.cpp falls back to Q5_0/Q8_0 (type fallback)."""
    spec = read_model_spec(smollm2_path())
    out = tmp_path / "q4km.gguf"
    _quantize(smollm2_path(), out, get_level("Q4_K_M").llama_ftype)
    real = read_model_spec(out)
    est = quantized_tensors(spec, "Q4_K_M")
    assert {t.name: t.ggml_type for t in real.tensors} == {t.name: t.ggml_type for t in est}
    assert real.weights_bytes == sum(t.n_bytes for t in est)
    assert real.bytes_by_type["Q5_0"] > 0  # the fallback is exercised
