"""Launch plans: llama-server and embedded argv, backend choice, reasons, and `edgeserve launch --dry-run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from server.cli import launch as launch_cli
from server.cli.serve import settings_from_argv
from server.launch import llama_server
from server.launch.plan import LaunchPlan
from server.launch.registry import UnknownBackendError, backend_choices, get_backend
from server.launch.resolve import PlanError


def _flag(plan: LaunchPlan, flag: str) -> str:
    i = plan.argv.index(flag)
    return plan.argv[i + 1]


def _flags(plan: LaunchPlan) -> set[str]:
    return {a for a in plan.argv[1:] if a.startswith("-") and not a.lstrip("-").isdigit()}


def test_registry_names_feed_the_cli_choices() -> None:
    assert backend_choices() == ("auto", "sglang", "llama-server", "embedded")
    with pytest.raises(UnknownBackendError, match="supported: auto, sglang, llama-server, embedded"):
        get_backend("vllm")


def test_llama_server_argv_on_the_p4(plan_for) -> None:
    plan = plan_for("tesla-p4", backend="llama-server")
    assert plan.argv[0] == "/opt/llama/bin/llama-server"
    assert _flags(plan) <= set(llama_server.EMITTED_FLAGS)
    # -c is the pool of all slots
    assert int(_flag(plan, "-c")) == plan.n_ctx * plan.n_parallel == plan.n_ctx_total
    assert int(_flag(plan, "-np")) == plan.n_parallel == 4
    assert int(_flag(plan, "-ngl")) == plan.n_layer + 1  # type: ignore[operator]
    assert _flag(plan, "-fa") == "on"  # this llama.cpp wants a value: on|off|auto
    assert _flag(plan, "-ctk") == _flag(plan, "-ctv") == "q8_0"
    assert _flag(plan, "--fit") == "off"
    assert "--metrics" in plan.argv
    assert "-t" not in plan.argv  # every layer on the GPU: no CPU threads to set
    assert plan.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}
    assert plan.health_url == "http://127.0.0.1:8080/health"
    assert plan.memory is not None and plan.memory.fits


def test_llama_server_on_a_5090_pair_splits_layers(plan_for) -> None:
    plan = plan_for("rtx-5090", backend="llama-server", gpus=2)
    assert _flag(plan, "--split-mode") == "layer"
    assert _flag(plan, "--tensor-split") == "1,1"
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_llama_server_on_the_cpu_sets_threads(plan_for) -> None:
    plan = plan_for("cpu", backend="llama-server")
    assert _flag(plan, "-ngl") == "0"
    assert _flag(plan, "-t") == "8"
    assert plan.env == {}  # llama.cpp's own OpenMP wait policy: its threads spin at barriers
    assert plan.reason("n_threads").source == "derived"  # type: ignore[union-attr]


def test_quantized_kv_turns_flash_attention_on_and_refuses_a_pinned_off(
    monkeypatch: pytest.MonkeyPatch, plan_for,
) -> None:
    monkeypatch.setenv("EDGESERVE_FLASH_ATTN", "off")
    with pytest.raises(PlanError, match="flash attention"):
        plan_for("rtx-3090", backend="llama-server", kv_type="q4_0")
    monkeypatch.delenv("EDGESERVE_FLASH_ATTN")
    plan = plan_for("rtx-3090", backend="llama-server", kv_type="q4_0")
    assert _flag(plan, "-fa") == "on" and _flag(plan, "-ctv") == "q4_0"


def test_kv_unified_caps_each_slot(monkeypatch: pytest.MonkeyPatch, plan_for) -> None:
    monkeypatch.setenv("EDGESERVE_KV_UNIFIED", "true")
    plan = plan_for("rtx-4090", backend="llama-server", n_parallel=8, n_ctx=2048)
    assert "-kvu" in plan.argv
    assert _flag(plan, "--kv-unified-per-slot") == "2048"
    assert _flag(plan, "-c") == str(8 * 2048)


def test_embedded_argv_uses_edgeserve_serve(plan_for) -> None:
    plan = plan_for("cpu")
    assert plan.backend == "embedded"
    assert plan.argv[:4] == ("edgeserve", "serve", "--backend", "embedded")
    # edgeserve serve's n_ctx is one sequence's context, as the plan's; the pool is n_ctx x n_parallel
    engine = settings_from_argv(plan.argv[2:]).engine
    assert engine.n_ctx == plan.n_ctx and engine.n_parallel == plan.n_parallel
    assert engine.n_ctx_total == plan.n_ctx_total
    assert _flag(plan, "--n-gpu-layers") == "0"
    assert plan.health_url.endswith(":8000/ready")
    # settings travel on the command line under the engine's names, not in invented variables
    for key in plan.env:
        assert key.startswith("CUDA_")


def test_embedded_refuses_what_the_engine_cannot_take(plan_for) -> None:
    # llama.cpp (and so the engine) has no fp8 cache; q8_0 is one it takes (see test_embedded.py)
    with pytest.raises(PlanError, match=r"llama\.cpp has no fp8_e4m3 KV cache"):
        plan_for("cpu", backend="embedded", kv_type="fp8_e4m3")


def test_auto_rule(bare_toolchain, full_toolchain, plan_for) -> None:
    assert plan_for("cpu").backend == "embedded"
    assert plan_for("rtx-5090", toolchain=full_toolchain).backend == "sglang"
    no_sglang = plan_for("rtx-5090", toolchain=full_toolchain.model_copy(update={"has_sglang": False}))
    assert no_sglang.backend == "embedded"  # measured faster than llama-server (backend_speed.yaml)
    cpu_engine = full_toolchain.model_copy(update={"has_sglang": False, "engine_gpu_offload": False})
    assert plan_for("rtx-5090", toolchain=cpu_engine).backend == "llama-server"
    assert plan_for("rtx-5090", toolchain=bare_toolchain).backend == "embedded"


def test_profile_values_that_do_not_fit_are_derived_down(tmp_path: Path, plan_for) -> None:
    (tmp_path / "tesla_p4.yaml").write_text("card: tesla-p4\nmax_num_seqs: 256\ncontext: 8192\n")
    plan = plan_for("tesla-p4", backend="llama-server", profiles_dir=tmp_path)
    # 256 x 8192 f16 cells of SmolLM2 are ~45 GiB: far over 8 GB, so the budget steps context, then slots down
    assert plan.n_ctx * plan.n_parallel < 256 * 8192
    assert plan.reason("n_ctx").source == "derived"  # type: ignore[union-attr]
    assert plan.memory is not None and plan.memory.fits
    assert int(_flag(plan, "-c")) == plan.n_ctx_total


def test_cli_values_are_never_derived_away(plan_for) -> None:
    plan = plan_for("tesla-p4", backend="llama-server", n_ctx=1_000_000, n_parallel=3)
    assert plan.n_ctx == 1_000_000 and plan.n_parallel == 3
    assert plan.reason("n_ctx").source == "cli"  # type: ignore[union-attr]
    assert plan.memory is not None and plan.memory.fits is False
    assert "OOM ladder" in plan.reason("expected_total_bytes").why  # type: ignore[union-attr]


def _app() -> typer.Typer:
    app = typer.Typer()
    launch_cli.register(app)

    @app.command("noop", hidden=True)
    def _noop() -> None:  # a second command keeps `launch` a named subcommand
        pass

    return app


def test_cli_dry_run_json() -> None:
    result = CliRunner().invoke(
        _app(), ["launch", "--card", "tesla-p4", "--dry-run", "--json", "--ctx", "2048"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in (
        "backend",
        "card",
        "gpus",
        "argv",
        "env",
        "n_ctx",
        "n_parallel",
        "mem_fraction",
        "kv_type",
        "expected_total_bytes",
        "reasons",
    ):
        assert key in data
    assert data["card"] == "tesla-p4" and data["n_ctx"] == 2048
    assert data["backend"] in ("llama-server", "embedded")
    assert {r["setting"]: r["source"] for r in data["reasons"]}["n_ctx"] == "cli"


def test_cli_sglang_pair_dry_run() -> None:
    result = CliRunner().invoke(
        _app(), ["launch", "--card", "rtx-5090", "--gpus", "2", "--backend", "sglang", "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "sglang" and "--tp-size" in data["argv"]
    assert data["argv"][data["argv"].index("--tp-size") + 1] == "2"


def test_cli_errors_are_one_line() -> None:
    result = CliRunner().invoke(_app(), ["launch", "--card", "tesla-p4", "--backend", "sglang", "--dry-run"])
    assert result.exit_code == 2
    assert "llama.cpp" in result.stderr and "Traceback" not in result.stderr
    result = CliRunner().invoke(_app(), ["launch", "--card", "voodoo-5", "--dry-run"])
    assert result.exit_code == 2 and "known ids" in result.stderr
    result = CliRunner().invoke(_app(), ["launch", "--backend", "vllm", "--dry-run"])
    assert result.exit_code == 2 and "llama-server" in result.stderr
