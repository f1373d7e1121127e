"""Rules with one home that the planner asks rather than re-derives: a quantized V cache needs flash attention
(quantize.model.kv_types), every layer on the GPU (server.llama.offload) and the engine's kv_unified default
(server.engine.config)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from quantize.budget import estimate
from quantize.bundled import smollm2_path
from quantize.model.gguf_file import read_model_spec
from quantize.model.kv_types import flash_attn_needed
from quantize.model.units import GIB
from server.engine.config import EngineConfig, default_kv_unified
from server.hardware.target import CpuTarget
from server.launch.resolve import PlanError
from server.llama.offload import is_full_offload


def test_engine_budget_and_plan_say_the_flash_attention_rule_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, plan_for
) -> None:
    rule = flash_attn_needed("q4_0")
    with pytest.raises(ValidationError, match=re.escape(rule)):
        EngineConfig(kv_type="q4_0", flash_attn="off")
    budget = estimate(
        CpuTarget(ram_bytes=8 * GIB), read_model_spec(smollm2_path()), kv_type="q4_0", flash_attn=False
    )
    assert budget.problems[0].message.startswith(rule)
    (tmp_path / "rtx_3090.yaml").write_text('card: rtx-3090\nflash_attn: "auto"\n')
    plan = plan_for("rtx-3090", backend="llama-server", kv_type="q4_0", profiles_dir=tmp_path)
    assert plan.flash_attn == "on" and plan.reason("flash_attn").why == rule  # type: ignore[union-attr]
    monkeypatch.setenv("EDGESERVE_FLASH_ATTN", "off")
    with pytest.raises(PlanError, match=re.escape(rule)):
        plan_for("rtx-3090", backend="llama-server", kv_type="q4_0")


@pytest.mark.parametrize("card", ["cpu", "rtx-4090"])
@pytest.mark.parametrize("n_parallel", [1, 32, 33, 64])
def test_the_plans_kv_unified_default_is_the_engines(plan_for, card: str, n_parallel: int) -> None:
    plan = plan_for(card, backend="embedded", n_parallel=n_parallel)
    assert plan.n_parallel == n_parallel
    assert plan.is_full_offload is (card != "cpu")
    assert plan.kv_unified == default_kv_unified(n_parallel, plan.is_full_offload)
    engine = EngineConfig(n_parallel=n_parallel, n_batch=max(512, n_parallel))
    assert plan.kv_unified == engine.unified_on(plan.is_full_offload)


def test_every_layer_on_the_gpu_is_one_rule(plan_for) -> None:
    assert is_full_offload(-1, 30) and is_full_offload(31, 30) and is_full_offload(99, 30)
    assert not is_full_offload(30, 30) and not is_full_offload(0, 30)
    full = plan_for("rtx-4090", backend="llama-server")
    assert full.is_full_offload and full.n_threads is None
    partial = plan_for("rtx-4090", backend="llama-server", n_gpu_layers=10)
    # layers on the CPU: threads are planned for them, and the memory estimate moves with the layers
    assert not partial.is_full_offload and partial.n_threads is not None
    assert partial.memory is not None and full.memory is not None
    assert partial.memory.weights_bytes < full.memory.weights_bytes
