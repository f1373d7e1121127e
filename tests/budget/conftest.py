"""Fixtures of the budget tests: the bundled SmolLM2's spec and a Llama-3.1-8B-shaped spec (from its Hugging
Face config alone)."""

from __future__ import annotations

import pytest

from quantize.bundled import smollm2_path
from quantize.model.gguf_file import read_model_spec
from quantize.model.hf_config import model_spec_from_hf_config
from quantize.model.spec import ModelSpec


@pytest.fixture(scope="module")
def smollm2() -> ModelSpec:
    return read_model_spec(smollm2_path())


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    cfg = tmp_path_factory.mktemp("l8b") / "config.json"
    cfg.write_text(
        '{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,'
        ' "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",'
        ' "max_position_embeddings": 131072}'
    )
    return model_spec_from_hf_config(cfg)
