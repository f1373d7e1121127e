"""`--level auto`: the highest-quality quantization level whose memory budget fits the target.

The choice is budget.best_level over the quantized levels; the candidates' budgets are kept so the CLI can
show why (each level's weights, total and headroom on the fullest device).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantize.budget.estimate import best_level, estimate
from quantize.budget.types import Backend, Budget
from quantize.model.levels import LEVELS, QuantLevel
from quantize.model.spec import ModelSpec
from quantize.model.units import MIB
from server.hardware.target import Target

# F16 is a conversion, not a quantization: the automatic choice is among the quantized levels.
QUANTIZED_LEVELS: tuple[QuantLevel, ...] = tuple(lv for lv in LEVELS if lv.is_quantized)


class NoLevelFitsError(ValueError):
    """Not even the smallest level fits; the message says how much is needed and how much there is."""


@dataclass(frozen=True)
class LevelChoice:
    """The chosen level and its budget, with every candidate's budget (highest quality first)."""

    level: QuantLevel
    budget: Budget
    candidates: tuple[tuple[QuantLevel, Budget], ...]
    target_label: str

    def settings(self) -> dict[str, object]:
        """The deployment the level was chosen for, for the manifest."""
        b = self.budget
        return {
            "target": self.target_label,
            "card": b.card,
            "gpus": b.gpus,
            "backend": b.backend,
            "n_ctx": b.n_ctx,
            "n_parallel": b.n_parallel,
            "kv_type": b.kv_type,
            "flash_attn": b.flash_attn,
        }


def choose_level(
    spec: ModelSpec,
    target: Target,
    *,
    backend: Backend = "llama-server",
    n_ctx: int = 4096,
    n_parallel: int = 1,
    kv_type: str | None = None,
    flash_attn: bool = True,
    levels: tuple[QuantLevel, ...] = QUANTIZED_LEVELS,
) -> LevelChoice:
    """Pick the level for `spec` on `target`; raise NoLevelFitsError when none fits."""
    kwargs: dict[str, object] = dict(
        backend=backend, n_ctx=n_ctx, n_parallel=n_parallel, kv_type=kv_type, flash_attn=flash_attn
    )
    ordered = tuple(sorted(levels, key=lambda lv: -lv.quality_rank))
    candidates = tuple((lv, estimate(target, spec, lv, **kwargs)) for lv in ordered)  # type: ignore[arg-type]
    picked = best_level(target, spec, ordered, **kwargs)
    label = target.label
    if picked is None:
        smallest_level, smallest = min(candidates, key=lambda c: c[1].total_bytes)
        why = "; ".join(smallest.reasons) or "it does not fit"
        raise NoLevelFitsError(
            f"no quantization level of {spec.name} fits {label} with n_ctx {n_ctx} x {n_parallel}: "
            f"even {smallest_level.name} needs {smallest.total_bytes / MIB:,.0f} MiB ({why})"
        )
    level, budget = picked
    return LevelChoice(level=level, budget=budget, candidates=candidates, target_label=label)
