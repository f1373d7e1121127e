"""What is wrong with a budget's settings, as typed values.

Each problem has a kind from one enum, and the kind alone says what it does to the verdict: the settings
cannot start (invalid), they start but not in this memory, or the budget only warns. `fits` and `is_valid`
are decided from the kinds; the message is rendered once, when the problem is made, for people to read
(`edgeserve plan`, JSON output, refusals), so rewording a message changes no verdict.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from pydantic import BaseModel, ConfigDict, computed_field

from quantize.model.kv_types import LLAMA_KV_TYPES, SGLANG_KV_TYPES, flash_attn_needed
from quantize.model.units import MIB


class Effect(str, Enum):
    """What a problem does to the budget's verdict."""

    INVALID = "invalid"  # the backend refuses the settings: is_valid and fits are both False
    DOES_NOT_FIT = "does_not_fit"  # the settings are valid but need more than the memory holds
    WARNING = "warning"  # said to the user; the verdicts stand (the backend decides at start-up)


class ProblemKind(str, Enum):
    """Every problem the budget calculator reports, one member each."""

    LLAMA_KV_TYPE = "llama_kv_type"  # llama.cpp has no such cache type
    SGLANG_KV_TYPE = "sglang_kv_type"  # SGLang has no such --kv-cache-dtype
    FLASH_ATTN_NEEDED = "flash_attn_needed"  # a quantized V cache without flash attention
    NO_FP8 = "no_fp8"  # an FP8 KV cache on a card without hardware FP8
    NO_FLASH_ATTN_KERNELS = "no_flash_attn_kernels"  # flash attention on a card llama.cpp has no kernels for
    KV_HEADS_SPLIT = "kv_heads_split"  # KV heads that tensor parallelism cannot split
    KV_POOL_SHORT = "kv_pool_short"  # SGLang's pool holds fewer tokens than asked for
    OVER_MEMORY = "over_memory"  # the fullest device needs more than its usable memory

    @property
    def effect(self) -> Effect:
        return _EFFECTS[self]


_EFFECTS: dict[ProblemKind, Effect] = {
    ProblemKind.LLAMA_KV_TYPE: Effect.INVALID,
    ProblemKind.SGLANG_KV_TYPE: Effect.INVALID,
    ProblemKind.FLASH_ATTN_NEEDED: Effect.INVALID,
    ProblemKind.NO_FP8: Effect.INVALID,
    ProblemKind.NO_FLASH_ATTN_KERNELS: Effect.WARNING,
    ProblemKind.KV_HEADS_SPLIT: Effect.WARNING,
    ProblemKind.KV_POOL_SHORT: Effect.DOES_NOT_FIT,
    ProblemKind.OVER_MEMORY: Effect.DOES_NOT_FIT,
}


class BudgetProblem(BaseModel):
    """One problem: its kind (which decides) and its message (which explains). Made by the functions below,
    one per kind, so each message is worded in one place."""

    model_config = ConfigDict(frozen=True)

    kind: ProblemKind
    message: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def effect(self) -> Effect:
        return self.kind.effect


def is_valid(problems: Iterable[BudgetProblem]) -> bool:
    """Whether the backend would take the settings at all."""
    return not any(p.effect is Effect.INVALID for p in problems)


def blocks_fit(problems: Iterable[BudgetProblem]) -> bool:
    """Whether any problem means the settings do not fit, whatever the per-device figures say."""
    return any(p.effect in (Effect.INVALID, Effect.DOES_NOT_FIT) for p in problems)


def has_kind(problems: Iterable[BudgetProblem], kind: ProblemKind) -> bool:
    return any(p.kind is kind for p in problems)


def llama_kv_type(kv_type: str) -> BudgetProblem:
    return BudgetProblem(
        kind=ProblemKind.LLAMA_KV_TYPE,
        message=f"llama.cpp KV type must be one of {', '.join(LLAMA_KV_TYPES)}, got {kv_type!r}",
    )


def sglang_kv_type(kv_type: str) -> BudgetProblem:
    return BudgetProblem(
        kind=ProblemKind.SGLANG_KV_TYPE,
        message=f"SGLang takes --kv-cache-dtype {'|'.join(SGLANG_KV_TYPES)}, not {kv_type!r}",
    )


def flash_attn_missing(kv_type: str) -> BudgetProblem:
    return BudgetProblem(
        kind=ProblemKind.FLASH_ATTN_NEEDED, message=f"{flash_attn_needed(kv_type)}; use --flash-attn or f16"
    )


def no_fp8(card_name: str) -> BudgetProblem:
    return BudgetProblem(
        kind=ProblemKind.NO_FP8, message=f"FP8 KV cache needs hardware FP8 (SM89+); {card_name} lacks it"
    )


def no_flash_attn_kernels(card_name: str) -> BudgetProblem:
    return BudgetProblem(
        kind=ProblemKind.NO_FLASH_ATTN_KERNELS,
        message=f"llama.cpp has no flash-attention kernels for {card_name}",
    )


def kv_heads_split(n_head_kv: int, tp: int) -> BudgetProblem:
    return BudgetProblem(
        kind=ProblemKind.KV_HEADS_SPLIT, message=f"{n_head_kv} KV heads do not split over TP {tp}"
    )


def kv_pool_short(pool_tokens: int, asked_tokens: int) -> BudgetProblem:
    return BudgetProblem(
        kind=ProblemKind.KV_POOL_SHORT,
        message=f"the KV pool holds {pool_tokens} tokens, fewer than the {asked_tokens} asked for",
    )


def over_memory(needed_bytes: int, usable_bytes: float) -> BudgetProblem:
    return BudgetProblem(
        kind=ProblemKind.OVER_MEMORY,
        message=f"needs {needed_bytes / MIB:,.0f} MiB on a device; {usable_bytes / MIB:,.0f} MiB usable",
    )
