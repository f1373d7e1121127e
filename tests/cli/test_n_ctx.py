"""`--ctx` (`--n-ctx`) means one thing in every command: the context of ONE sequence. `plan` and `launch`
agree on it and on the pool it implies; every --help says so; `serve` shows the engine's own default."""

from __future__ import annotations

import json
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from loadtest import tuner
from server.cli import launch, plan, quantize, serve
from server.cli.serve import settings_from_argv
from server.engine.config import EngineConfig


def _command(module: object) -> Any:
    """The click command a module registers (`tune run` for the tuner's group)."""
    group = typer.main.get_command(_group(module))
    name = next(n for n in group.commands if n != "noop")  # type: ignore[attr-defined]
    command = group.commands[name]  # type: ignore[attr-defined]
    return command.commands["run"] if hasattr(command, "commands") else command


def _n_ctx_option(command: Any) -> Any:
    return next(p for p in command.params if p.name == "n_ctx")


@pytest.mark.parametrize("module", [plan, launch, serve, quantize, tuner])
def test_every_command_says_n_ctx_is_one_sequence(module: object) -> None:
    option = _n_ctx_option(_command(module))
    assert {"--n-ctx", "--ctx"} <= set(option.opts)  # dest n_ctx; the old spelling still works
    assert "ONE sequence" in (option.help or "")


def test_serve_shows_the_engines_own_default(clean_env: None) -> None:
    # Bug: `serve --ctx` said "(default 4096)" while the engine's default was 8192 (and a total, at that).
    option = _n_ctx_option(_command(serve))
    default = EngineConfig.model_fields["n_ctx"].default
    assert f"(default: {default})" in (option.help or "")
    assert settings_from_argv([]).engine.n_ctx == default
    assert settings_from_argv(["--ctx", "1024"]).engine.n_ctx == 1024


def test_plan_and_launch_agree_on_n_ctx_and_the_pool(clean_env: None) -> None:
    # Bug: `launch --ctx 32768 --parallel 4` meant 32768 tokens per sequence (-c 131072) while `plan --ctx`
    # was the total over all slots: the same flags budgeted a four times smaller KV cache.
    flags = ["--card", "rtx-5090", "--ctx", "4096", "--parallel", "4", "--json"]
    planned = CliRunner().invoke(_group(plan), ["plan", *flags])
    assert planned.exit_code == 0, planned.output
    budget = json.loads(planned.stdout)
    launch_flags = [*flags, "--backend", "llama-server", "--dry-run"]
    launched = CliRunner().invoke(_group(launch), ["launch", *launch_flags])
    assert launched.exit_code == 0, launched.output
    plan_json = json.loads(launched.stdout)
    assert budget["n_ctx"] == plan_json["n_ctx"] == 4096
    assert budget["n_ctx_total"] == plan_json["n_ctx_total"] == 4 * 4096
    argv = plan_json["argv"]
    assert argv[argv.index("-c") + 1] == str(4 * 4096)  # llama-server's -c is the pool of all slots
    assert budget["kv_bytes"] == plan_json["memory"]["kv_bytes"]


def _group(module: object) -> typer.Typer:
    app = typer.Typer()
    module.register(app)  # type: ignore[attr-defined]
    app.command("noop", hidden=True)(lambda: None)  # keeps the command a named subcommand
    return app
