"""Fixtures shared by every test folder: the repository root, an environment without EDGESERVE_* settings,
and a Hugging Face checkpoint of the Llama-3.1-8B shape (its config.json alone: what the planner reads)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests are not users: pytest, several servers and their clients share a small CI machine's cores, and
# llama.cpp's OpenMP threads that spin at a barrier there hold a core from the thread that is late (a step
# once took 3 s instead of 17 ms). Every server a test starts inherits this; users get llama.cpp's own
# default (docs/BENCHMARKS.md, "CPU threads and how they wait").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The one Llama-3.1-8B config of the tests (shapes from its Hugging Face config.json).
LLAMA_31_8B_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
}


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (where pyproject.toml is)."""
    return Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EDGESERVE_* variable from the caller's shell leaks into the settings under test."""
    for key in list(os.environ):
        if key.startswith("EDGESERVE_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def llama31_8b_config() -> dict[str, object]:
    return dict(LLAMA_31_8B_CONFIG)


@pytest.fixture
def hf_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """hf_model_dir(config=None) -> a checkpoint folder with only its config.json (default: Llama-3.1-8B)."""

    def make(config: dict[str, object] | None = None) -> Path:
        folder = tmp_path / "Llama-3.1-8B-Instruct"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config or LLAMA_31_8B_CONFIG))
        return folder

    return make


@pytest.fixture(autouse=True)
def _no_user_tuned_profiles(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tuned profiles that `edgeserve tune` left in the user's config folder never reach a test (a test that
    wants one names its own folder with EDGESERVE_TUNED_DIR)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "xdg-config"))
