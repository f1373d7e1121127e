"""The models file (server/gateway/models/models_file.py): what it accepts, what it refuses and why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.gateway.models.models_file import SGLANG_REFUSAL, ModelsFile, load_models_file


def test_the_example_file_reads(repo: Path) -> None:
    models = load_models_file(repo / "server/gateway/models.example.yaml")
    assert [m.name for m in models.models] == ["chat", "coder", "embed", "small"]
    assert models.entry_for("gpt-4o-mini") is models.models[0]
    assert models.models[0].policy.pinned and models.models[1].backend == "llama-server"
    assert models.models[1].policy.idle_ttl_s == 600 and models.models[1].policy.priority == 1
    assert models.models[3].engine_config().n_ctx == 2048


def test_sglang_is_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError) as info:
        ModelsFile.model_validate({"models": [{"name": "a", "backend": "sglang"}]})
    assert SGLANG_REFUSAL in str(info.value)


def test_a_name_served_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="served by both 'a' and 'b'"):
        ModelsFile.model_validate({"models": [{"name": "a", "served_names": ["x"]},
                                              {"name": "b", "served_names": ["x"]}]})


def test_settings_are_the_engines_own_fields_checked_by_it() -> None:
    with pytest.raises(ValidationError, match="n_ctx"):
        ModelsFile.model_validate({"models": [{"name": "a", "settings": {"n_ctx": 1}}]})
    with pytest.raises(ValidationError, match="ctx_size"):
        ModelsFile.model_validate({"models": [{"name": "a", "settings": {"ctx_size": 512}}]})


def test_relative_paths_are_the_files_folder(models_file: Callable[..., Path], tmp_path: Path) -> None:
    path = models_file([{"name": "a", "path": "m.gguf"}], budget_mib=100)
    models = load_models_file(path)
    assert models.models[0].path == str(tmp_path / "m.gguf") and models.budget_mib == 100
    assert models.entry_for("nope") is None


def test_serve_refuses_an_sglang_model_with_the_reason(models_file: Callable[..., Path]) -> None:
    import typer
    from typer.testing import CliRunner

    from server.cli import serve

    app = typer.Typer()
    serve.register(app)
    path = models_file([{"name": "chat"}, {"name": "big", "backend": "sglang"}])
    result = CliRunner().invoke(app, ["--models", str(path)])
    assert result.exit_code == 2
    assert "models.1.backend" in result.output and "one model per server" in result.output
