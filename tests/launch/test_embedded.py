"""The embedded launcher and `edgeserve serve` speak one vocabulary: every EngineConfig field is a serve
option of the same name, and what a plan chooses (KV type, flash attention, unified KV, threads, batch
sizes) arrives in the engine's config when the rendered argv is parsed by serve's own settings builder."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from server.cli import serve as serve_cli
from server.cli.serve import settings_from_argv
from server.engine.config import EngineConfig
from server.launch.embedded import engine_config
from server.launch.plan import LaunchPlan


def _engine_of(plan: LaunchPlan) -> EngineConfig:
    """The engine's config `edgeserve serve` builds from the plan's argv (after the program and `serve`)."""
    assert plan.argv[:2] == ("edgeserve", "serve"), plan.argv[:2]
    return settings_from_argv(plan.argv[2:]).engine


def test_every_engine_field_is_a_serve_option_of_the_same_name() -> None:
    app = typer.Typer()
    serve_cli.register(app)
    command = typer.main.get_command(app)
    options = {p.name: p.opts for p in command.params}
    for name in EngineConfig.model_fields:
        assert name in options, f"serve has no option for EngineConfig.{name}"
        assert "--" + name.replace("_", "-") in options[name]


@pytest.mark.parametrize(
    ("card", "flags"),
    [
        ("cpu", {}),
        ("cpu", {"n_ctx": 1024, "n_parallel": 2, "n_threads": 3, "n_batch": 256, "n_ubatch": 64}),
        ("tesla-p4", {}),
        ("rtx-4090", {"kv_unified": True, "n_parallel": 8, "flash_attn": "off", "kv_type": "f16"}),
    ],
)
def test_a_plans_values_arrive_in_the_engines_config(card: str, flags: dict[str, object], plan_for) -> None:
    plan = plan_for(card, backend="embedded", **flags)
    engine = _engine_of(plan)
    assert engine == engine_config(plan)
    for name in EngineConfig.model_fields:
        if name in LaunchPlan.model_fields and getattr(plan, name) is not None:
            assert getattr(engine, name) == getattr(plan, name), name


def test_the_plan_and_the_engine_use_one_kv_layout(plan_for) -> None:
    # Bug: the launcher kept ENGINE_DEFAULTS["kv_unified"] = True while the engine defaulted to False, so
    # embedded plans were budgeted for a layout the engine never used. Now the plan decides (one pool with
    # several slots, on the CPU and on a GPU: issue 19 measured a cache per sequence losing on mixed prompts
    # at every slot count) and the engine is told.
    plan = plan_for("cpu", backend="embedded", n_parallel=4)
    assert plan.kv_unified is True and _engine_of(plan).kv_unified is True
    assert "CPU" in plan.reason("kv_unified").why  # type: ignore[union-attr]
    assert plan_for("cpu", backend="llama-server", n_parallel=4).kv_unified is False  # llama-server's own
    single = plan_for("cpu", backend="embedded", n_parallel=1)
    assert single.kv_unified is False and _engine_of(single).kv_unified is False
    few = plan_for("rtx-4090", backend="embedded", n_parallel=8)
    assert few.kv_unified is True and _engine_of(few).kv_unified is True
    assert plan_for("rtx-4090", backend="llama-server", n_parallel=8).kv_unified is False  # its own layout
    gpu = plan_for("rtx-4090", backend="embedded", n_parallel=48, n_ctx=1024)
    assert gpu.kv_unified is True and _engine_of(gpu).kv_unified is True
    reason = gpu.reason("kv_unified")
    assert reason is not None and reason.source == "derived" and "GPU" in reason.why
    per_sequence = plan_for("cpu", backend="embedded", n_parallel=4, kv_unified=False)
    assert per_sequence.kv_unified is False and _engine_of(per_sequence).kv_unified is False


def test_threads_reach_the_engine(plan_for) -> None:
    # Bug: the launcher said serve had no threads setting (while `serve --threads` existed) and dropped it.
    plan = plan_for("cpu", backend="embedded", n_threads=3)
    assert plan.n_threads == 3
    assert _engine_of(plan).n_threads == 3
    derived = plan_for("cpu", backend="embedded")
    # Unset: the engine's threads follow the cores other processes leave free (server/engine/cpu_share.py).
    assert _engine_of(derived).n_threads is None and derived.n_threads is None
    assert "free" in derived.reason("n_threads").why  # type: ignore[union-attr]
    assert plan_for("cpu", backend="llama-server").n_threads == 8  # one per usable CPU of the toolchain


def test_a_profiles_q8_0_kv_and_flash_attention_reach_the_engine(tmp_path: Path, plan_for) -> None:
    # Bug: a profile's q8_0 KV cache and flash attention were replaced by the engine's defaults without a
    # word when the embedded backend was planned.
    (tmp_path / "cpu.yaml").write_text("card: cpu\nkv_type: q8_0\nflash_attn: 'on'\nn_batch: 512\n")
    plan = plan_for("cpu", backend="embedded", profiles_dir=tmp_path)
    assert (plan.kv_type, plan.flash_attn) == ("q8_0", "on")
    assert plan.reason("kv_type").source == "profile"  # type: ignore[union-attr]
    engine = _engine_of(plan)
    assert (engine.kv_type, engine.flash_attn) == ("q8_0", "on")


def test_the_rendered_argv_names_only_what_differs_from_the_engines_defaults(plan_for) -> None:
    default = EngineConfig()
    plan = plan_for("cpu", backend="embedded", n_ctx=default.n_ctx, n_parallel=default.n_parallel)
    assert "--n-ctx" not in plan.argv and "--n-parallel" not in plan.argv
    assert "--model-path" in plan.argv and "--n-gpu-layers" in plan.argv
    bigger = plan_for("cpu", backend="embedded", n_ctx=4096)
    assert bigger.argv[bigger.argv.index("--n-ctx") + 1] == "4096"
