"""Fixtures of the model pool's tests: a larger variant of the bundled model, made by the quantize pipeline
(Q8_0 of SmolLM2-135M: about 40 % more than the bundled Q4_1), and models files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantize.bundled import smollm2_path
from quantize.pipeline import QuantizeOptions, execute, prepare, resolve_level


@pytest.fixture(scope="session")
def larger_variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M at Q8_0, quantized from the bundled Q4_1 by edgeserve's pipeline."""
    out = tmp_path_factory.mktemp("variant") / "SmolLM2-135M-Instruct.Q8_0.gguf"
    options = QuantizeOptions(out=out, allow_requantize=True, verify_tokens=1)
    execute(prepare(smollm2_path(), resolve_level("Q8_0"), options))
    return out


@pytest.fixture
def models_file(tmp_path: Path) -> Callable[..., Path]:
    """models_file(models, **top) -> a models file with these entries and top-level keys."""

    def write(models: list[dict[str, Any]], **top: Any) -> Path:
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump({**top, "models": models}, sort_keys=False))
        return path

    return write
