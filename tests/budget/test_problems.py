"""Budget problems are typed values: the kind decides the verdict, the message only explains it."""

from __future__ import annotations

from quantize.budget import estimate
from quantize.budget.problems import BudgetProblem, Effect, ProblemKind
from quantize.model.kv_types import flash_attn_needed
from quantize.model.spec import ModelSpec
from quantize.model.units import GIB, MIB
from server.hardware.cards import GpuSet, get_card
from server.hardware.target import CpuTarget

CPU = CpuTarget(ram_bytes=8 * GIB)


def test_every_kind_has_an_effect() -> None:
    assert {kind.effect for kind in ProblemKind} == set(Effect)


def test_the_verdict_is_decided_by_the_kind_not_the_message(smollm2: ModelSpec) -> None:
    fitting = estimate(CPU, smollm2, n_ctx=4096)
    assert fitting.fits and fitting.is_valid and fitting.problems == () and fitting.reasons == ()

    reworded = BudgetProblem(kind=ProblemKind.FLASH_ATTN_NEEDED, message="worded any way at all")
    invalid = fitting.model_copy(update={"problems": (reworded,)})
    assert not invalid.is_valid and not invalid.fits
    assert invalid.reasons == ("worded any way at all",)

    # the words the verdict was once searched for decide nothing in a warning
    old_words = "requires flash attention; KV type; kv-cache-dtype; FP8 KV; KV pool holds; llama.cpp KV type"
    warning = BudgetProblem(kind=ProblemKind.NO_FLASH_ATTN_KERNELS, message=old_words)
    warned = fitting.model_copy(update={"problems": (warning,)})
    assert warned.is_valid and warned.fits

    short = fitting.model_copy(
        update={"problems": (BudgetProblem(kind=ProblemKind.KV_POOL_SHORT, message=""),)}
    )
    assert short.is_valid and not short.fits
    assert short.has(ProblemKind.KV_POOL_SHORT) and not short.has(ProblemKind.OVER_MEMORY)


def test_a_quantized_v_without_flash_attention_is_invalid_by_kind(smollm2: ModelSpec) -> None:
    b = estimate(GpuSet.of(get_card("tesla-p4")), smollm2, n_ctx=4096, kv_type="q8_0", flash_attn=False)
    assert [p.kind for p in b.problems] == [ProblemKind.FLASH_ATTN_NEEDED]
    assert b.problems[0].effect is Effect.INVALID and not b.is_valid and not b.fits
    assert b.problems[0].message.startswith(flash_attn_needed("q8_0"))
    assert b.reasons == (b.problems[0].message,)


def test_kv_caches_a_backend_or_card_cannot_run_are_invalid(smollm2: ModelSpec, llama8b: ModelSpec) -> None:
    llama = estimate(CPU, smollm2, kv_type="fp8_e4m3")
    assert [p.kind for p in llama.problems] == [ProblemKind.LLAMA_KV_TYPE] and not llama.is_valid
    no_fp8 = estimate(
        GpuSet.of(get_card("a100-80gb")), llama8b, "Q4_K_M", backend="sglang", kv_type="fp8_e4m3"
    )
    assert [p.kind for p in no_fp8.problems] == [ProblemKind.NO_FP8] and not no_fp8.is_valid


def test_too_little_memory_does_not_fit_but_is_valid(smollm2: ModelSpec) -> None:
    tiny = estimate(CpuTarget(ram_bytes=128 * MIB), smollm2, n_ctx=4096)
    assert [p.kind for p in tiny.problems] == [ProblemKind.OVER_MEMORY]
    assert tiny.is_valid and not tiny.fits
    assert tiny.reasons[0].startswith(f"needs {tiny.total_bytes / MIB:,.0f} MiB on a device")


def test_the_json_carries_the_problems_and_their_verdicts(smollm2: ModelSpec) -> None:
    data = estimate(CPU, smollm2, kv_type="q4_0", flash_attn=False).model_dump(mode="json")
    assert data["problems"] == [
        {"kind": "flash_attn_needed", "message": data["reasons"][0], "effect": "invalid"}
    ]
    assert data["is_valid"] is False and data["fits"] is False
