"""A model's facts from whatever the user names, with no weights read.

The name may be a GGUF file, a Hugging Face checkpoint folder or its config.json; only the header or the
config is read.
"""

from __future__ import annotations

from pathlib import Path

from quantize.model.gguf_file import read_model_spec
from quantize.model.hf_config import model_spec_from_hf_config
from quantize.model.spec import ModelSpec


def read_spec(path: str | Path) -> ModelSpec:
    """ModelSpec of a GGUF file or an HF checkpoint (folder or config.json). Raises GGUFReadError (an HF
    config's problems are a subclass of it) or OSError."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".json":
        return model_spec_from_hf_config(path)
    return read_model_spec(path)
