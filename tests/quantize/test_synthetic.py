"""quantize.synthetic: llama GGUFs with random weights and a real tokenizer, read by gguf and by llama.cpp."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from quantize.bundled import smollm2_path
from quantize.llama_session import LlamaSession
from quantize.model.gguf_file import read_model_spec
from quantize.model.tensor_types import estimate_weights_bytes
from quantize.model.units import GIB
from quantize.synthetic import (
    LLAMA31_8B,
    TINY,
    SyntheticShape,
    _to_bf16_bits,
    synthetic_model_spec,
    write_synthetic_gguf,
)


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_gguf(tmp_path_factory.mktemp("synthetic") / "tiny-F16.gguf", TINY, seed=1)


def _tokenizer_fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("tokenizer.")}


def test_tiny_reads_back_with_the_shape_asked_for(tiny_f16: Path) -> None:
    spec = read_model_spec(tiny_f16)
    assert spec.architecture == "llama"
    assert (spec.n_layer, spec.n_embd, spec.n_head, spec.n_ff) == (2, 256, 4, 512)
    assert spec.n_head_kv == (2, 2)
    assert spec.head_dim_k == spec.head_dim_v == 64
    assert spec.file_type == gguf.LlamaFileType.MOSTLY_F16
    assert spec.n_vocab == len(_tokenizer_fields(smollm2_path())["tokenizer.ggml.tokens"])  # type: ignore[arg-type]
    for t in spec.tensors:
        assert t.ggml_type == ("F16" if t.n_dims == 2 else "F32"), t.name
    assert not spec.is_output_tied
    assert tiny_f16.stat().st_mode & 0o777 != 0o600, "the temporary file's private mode leaked"


def test_every_tokenizer_key_is_copied_chat_template_included(tiny_f16: Path) -> None:
    source = _tokenizer_fields(smollm2_path())
    copied = _tokenizer_fields(tiny_f16)
    assert "tokenizer.chat_template" in source
    assert copied == source


def test_llama_cpp_loads_it_and_tokenizes_like_the_real_model(tiny_f16: Path) -> None:
    text = "Hello world, this is edgeserve: 12345 tokens!"
    with LlamaSession(smollm2_path(), n_ctx=64) as real:
        expected = real.tokenize(text)
    with LlamaSession(tiny_f16, n_ctx=64) as session:
        assert session.tokenize(text) == expected
        logits = session.decode(session.tokenize(text), 0, 0)
        run = session.greedy("The quick brown fox", 6, stop_at_eog=False)
    assert np.all(np.isfinite(logits))
    # small weights keep the logits in a sane range (no saturation, no collapse)
    assert 0.01 < float(logits.std()) < 10.0
    assert len(run.tokens) == 6


def test_spec_without_a_file_matches_the_file(tiny_f16: Path) -> None:
    on_disk = read_model_spec(tiny_f16)
    predicted = synthetic_model_spec(TINY, on_disk.n_vocab)
    assert [(t.name, t.shape, t.ggml_type, t.n_bytes) for t in predicted.tensors] == [
        (t.name, t.shape, t.ggml_type, t.n_bytes) for t in on_disk.tensors
    ]
    assert predicted.n_head_kv == on_disk.n_head_kv


def test_llama31_8b_shape_has_the_real_model_size() -> None:
    spec = synthetic_model_spec(LLAMA31_8B, 128256)
    assert spec.n_params == 8_030_261_248  # Llama-3.1-8B's parameter count
    assert spec.weights_bytes / GIB == pytest.approx(14.96, abs=0.01)
    # llama.cpp's Q4_K_M of Llama-3.1-8B is 4.58 GiB (4.89 bits per weight)
    assert estimate_weights_bytes(spec, "Q4_K_M") / GIB == pytest.approx(4.58, abs=0.01)
    assert TINY.is_k_quant_friendly and LLAMA31_8B.is_k_quant_friendly


def test_llama32_3b_shape_has_the_real_model_size() -> None:
    from quantize.synthetic import LLAMA32_3B, PRESETS

    spec = synthetic_model_spec(LLAMA32_3B, 128256)
    assert spec.n_params == 3_212_749_824  # Llama-3.2-3B's parameter count (tied embeddings)
    assert PRESETS["llama32-3b"] is LLAMA32_3B and LLAMA32_3B.is_k_quant_friendly


def test_bf16_bits_round_to_nearest_even() -> None:
    values = np.array([1.0, -2.5, 1.00390625, 1.01171875, 3.14159265], dtype=np.float32)
    bits = _to_bf16_bits(values)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    assert back[0] == 1.0 and back[1] == -2.5
    assert back[2] == 1.0  # halfway between 1.0 and 1.0078125: ties to even
    assert back[3] == 1.015625  # halfway, rounds up to the even mantissa
    assert abs(back[4] - 3.14159265) < 0.01


def test_bad_requests_fail_before_writing(tmp_path: Path) -> None:
    not_gguf = tmp_path / "vocab.gguf"
    not_gguf.write_text("not a gguf")
    with pytest.raises(ValueError, match="cannot read a tokenizer"):
        write_synthetic_gguf(tmp_path / "a.gguf", TINY, vocab_from=not_gguf)
    with pytest.raises(ValueError, match="unsupported ftype"):
        write_synthetic_gguf(tmp_path / "b.gguf", TINY, ftype="Q4_0")
    with pytest.raises(ValueError, match="only 'llama'"):
        write_synthetic_gguf(tmp_path / "c.gguf", TINY, arch="gemma3")
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        SyntheticShape(n_layer=1, n_embd=256, n_head=4, n_head_kv=3, n_ff=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.gguf"]
