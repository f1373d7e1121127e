"""The OOM ladder: a pure function from a plan that ran out of memory to the next, smaller plan.

Order (each rung is used until it can go no further, then the next; a backend skips rungs it has no knob for):
  1. context      - halve the context of each sequence (down to 1024 tokens); when the log (or else the
                    plan's estimate) says how much memory was needed and the supervisor knows how much there
                    was, jump straight to about what fits instead of halving
  2. parallel     - halve the number of sequences decoded at once (down to 1)
  3. mem_fraction - SGLang: lower --mem-fraction-static by 0.05 (down to 0.5); when SGLang said its KV
                    pool got no room ("Not enough memory ... increase --mem-fraction-static") raise it
                    instead (up to 0.95)
  4. kv_type      - f16 -> q8_0 -> q4_0 (llama.cpp, flash attention on); SGLang: auto -> fp8_e4m3 on FP8 cards
  5. quant        - the next smaller quantization of the same model, if such a file lies next to it
  6. gpu_layers   - move a quarter of the layers to the CPU at a time
  7. cpu          - everything on the CPU (the GPUs hidden from the process)
`next_step(plan, failure)` returns None when the failure is not out-of-memory or no rung is left.
"""

from __future__ import annotations

import math
from typing import Any

from quantize.model.kv_types import LLAMA_KV_TYPES, needs_flash_attn
from quantize.model.units import MIB
from server.hardware.cards import UnknownCardError, get_card
from server.hardware.oom import Failure
from server.hardware.target import CPU_ID
from server.launch import memory
from server.launch.plan import LaunchPlan, Reason, StepTaken
from server.launch.registry import get_backend
from server.llama.offload import offload_layers

RUNGS = ("context", "parallel", "mem_fraction", "kv_type", "quant", "gpu_layers", "cpu")
MIN_LADDER_CTX = 1024
MIN_MEM_FRACTION = 0.5
MAX_MEM_FRACTION = 0.95
MEM_FRACTION_STEP = 0.05
LLAMA_KV_LADDER = ("f16", "q8_0", "q4_0")
# A failed allocation this much bigger than the memory there was is not worth halving towards.
_JUMP_SAFETY = 0.8

# A rung's change: plan fields to update, and why.
Step = tuple[dict[str, Any], str]


def _round_ctx(n: int) -> int:
    return max(256, n // 256 * 256)


def _step_context(plan: LaunchPlan, failure: Failure) -> Step | None:
    floor = min(MIN_LADDER_CTX, plan.n_ctx)
    if plan.n_ctx <= floor:
        return None
    factor = 0.5
    why = "halve the context"
    need, have = failure.requested_bytes, failure.available_bytes
    if need is None and plan.memory is not None:
        need = plan.memory.total_bytes  # the log did not say; the plan's own estimate is the next best figure
    if need and have and have / need < factor:
        factor = have / need * _JUMP_SAFETY
        why = (
            f"the memory needed ({need / MIB:.0f} MiB) is {need / have:.1f}x the memory there was "
            f"({have / MIB:.0f} MiB): scale the context to fit"
        )
    new_ctx = max(floor, _round_ctx(int(plan.n_ctx * factor)))
    if new_ctx >= plan.n_ctx:
        new_ctx = max(floor, _round_ctx(plan.n_ctx // 2))
    return {"n_ctx": new_ctx}, why


def _step_parallel(plan: LaunchPlan, failure: Failure) -> Step | None:
    if plan.n_parallel <= 1:
        return None
    n = max(1, plan.n_parallel // 2)
    return {"n_parallel": n}, "halve the sequences decoded at once"


def _step_mem_fraction(plan: LaunchPlan, failure: Failure) -> Step | None:
    if plan.mem_fraction is None:
        return None
    if failure.cause == "pool_too_small":
        if plan.mem_fraction >= MAX_MEM_FRACTION:
            return None
        new = min(MAX_MEM_FRACTION, round(plan.mem_fraction + MEM_FRACTION_STEP, 3))
        return {
            "mem_fraction": new
        }, "SGLang's KV pool got no room after the weights: raise the static fraction"
    if plan.mem_fraction <= MIN_MEM_FRACTION:
        return None
    new = max(MIN_MEM_FRACTION, round(plan.mem_fraction - MEM_FRACTION_STEP, 3))
    return {"mem_fraction": new}, "leave more memory outside SGLang's static pool (activations, CUDA graphs)"


def _can_fp8(card_id: str) -> bool:
    if card_id == CPU_ID:
        return False
    try:
        return get_card(card_id).can_fp8_kv
    except UnknownCardError:
        return False


def _step_kv_type(plan: LaunchPlan, failure: Failure) -> Step | None:
    if plan.backend == "sglang":
        if plan.kv_type in ("auto", "bf16") and _can_fp8(plan.card):
            return {"kv_type": "fp8_e4m3"}, "fp8 KV cache: half the bytes per token"
        return None
    if plan.kv_type not in LLAMA_KV_TYPES:
        return None
    current = "f16" if plan.kv_type in ("f32", "bf16") else plan.kv_type
    if current not in LLAMA_KV_LADDER or current == LLAMA_KV_LADDER[-1]:
        return None
    new = LLAMA_KV_LADDER[LLAMA_KV_LADDER.index(current) + 1]
    if plan.flash_attn == "off" and needs_flash_attn(new):
        return None  # off because the card lacks the kernels or the user said so: no quantized cache then
    return {"kv_type": new, "flash_attn": "on"}, f"{new} KV cache: fewer bytes per token"


def _step_quant(plan: LaunchPlan, failure: Failure) -> Step | None:
    if not plan.quant_alternatives:
        return None
    best = max(plan.quant_alternatives, key=lambda q: q.size_bytes)
    rest = tuple(q for q in plan.quant_alternatives if q.size_bytes < best.size_bytes)
    update: dict[str, Any] = {"model_path": best.path, "quant": best.quant, "model_bytes": best.size_bytes}
    return update | {"quant_alternatives": rest}, f"smaller quantization {best.quant} ({best.path})"


def _step_gpu_layers(plan: LaunchPlan, failure: Failure) -> Step | None:
    if plan.n_gpu_layers is None or plan.n_layer is None or plan.gpus == 0:
        return None
    quarter = math.ceil(offload_layers(plan.n_layer) / 4)
    if plan.n_gpu_layers <= quarter:
        return None
    new = plan.n_gpu_layers - quarter
    return {"n_gpu_layers": new}, f"move {quarter} more layers to the CPU"


def _step_cpu(plan: LaunchPlan, failure: Failure) -> Step | None:
    if plan.gpus == 0 or plan.n_gpu_layers is None:
        return None
    return {"n_gpu_layers": 0, "gpus": 0}, "run on the CPU with the GPUs hidden"


_STEPPERS = {
    "context": _step_context,
    "parallel": _step_parallel,
    "mem_fraction": _step_mem_fraction,
    "kv_type": _step_kv_type,
    "quant": _step_quant,
    "gpu_layers": _step_gpu_layers,
    "cpu": _step_cpu,
}
# Rungs that help when SGLang says its pool is too small (shrinking requests does not).
_POOL_RUNGS = ("mem_fraction", "kv_type", "quant")


def next_step(plan: LaunchPlan, failure: Failure) -> LaunchPlan | None:
    """The next plan down the ladder after `failure`, or None (not an OOM, or nothing left to give up)."""
    if not failure.is_oom:
        return None
    spec = get_backend(plan.backend)
    order = _POOL_RUNGS if failure.cause == "pool_too_small" else RUNGS
    for rung in order:
        if rung not in spec.rungs:
            continue
        step = _STEPPERS[rung](plan, failure)
        if step is None:
            continue
        update, why = step
        return _apply(plan, rung, update, why, failure)
    return None


def step_count(plan: LaunchPlan) -> int:
    """How many ladder steps led to this plan."""
    return plan.ladder[-1].step if plan.ladder else 0


def _apply(plan: LaunchPlan, rung: str, update: dict[str, Any], why: str, failure: Failure) -> LaunchPlan:
    number = step_count(plan) + 1
    evidence = f" ({failure.evidence[:160]})" if failure.evidence else ""
    taken: list[StepTaken] = []
    reasons: list[Reason] = []
    for setting, new in update.items():
        old = getattr(plan, setting)
        if setting in ("quant_alternatives", "model_bytes") or old == new:
            continue
        taken.append(StepTaken(step=number, rung=rung, setting=setting, old=old, new=new, why=why))
        reasons.append(
            Reason(
                setting=setting,
                value=new,
                source="derived",
                why=f"OOM ladder step {number} ({rung}): {why}{evidence}",
            )
        )
    history = {"ladder": (*plan.ladder, *taken), "reasons": (*plan.reasons, *reasons)}
    stepped = plan.model_copy(update={**update, **history})
    estimate = memory.rescale(plan, stepped)
    stepped = stepped.model_copy(
        update={
            "memory": estimate,
            "expected_total_bytes": estimate.total_bytes if estimate else None,
        }
    )
    return get_backend(stepped.backend).finish(stepped)
