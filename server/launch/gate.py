"""A plan against the memory free right now, before anything starts (quantize.budget.gate for plans).

The planner sizes a plan against the card's capacity; here it meets what is really free on this machine
(other processes hold VRAM, RAM is shared). A plan that does not fit is refused with its own numbers and the
nearest settings that would (`replan` builds the plan for other n_ctx / n_parallel), unless --force.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from quantize.budget.gate import FitCheck, check_fit_bytes, nearest_fit, refusal
from server.launch.plan import LaunchPlan


def plan_needs(plan: LaunchPlan) -> list[int]:
    """Bytes per device the plan needs: its fullest GPU's share for each GPU, or the host's RAM."""
    if plan.memory is None:
        return []
    return [plan.memory.total_bytes] * max(plan.gpus, 1)


def check_plan(plan: LaunchPlan, free: Sequence[tuple[str, int]]) -> FitCheck | None:
    """None where the plan has no memory estimate (nothing to check)."""
    needs = plan_needs(plan)
    return check_fit_bytes(needs, free) if needs else None


def plan_refusal(plan: LaunchPlan, free: Sequence[tuple[str, int]],
                 replan: Callable[[int, int], LaunchPlan]) -> str | None:
    """None when the plan fits what is free; else the message, with the nearest settings that fit."""
    check = check_plan(plan, free)
    if check is None or check.fits:
        return None
    assert plan.memory is not None

    def fits(n_ctx: int, n_parallel: int) -> bool:
        trial = check_plan(replan(n_ctx, n_parallel), free)
        return trial is None or trial.fits

    m = plan.memory
    return refusal(n_parallel=plan.n_parallel, n_ctx=plan.n_ctx, kv_type=plan.kv_type, kv_bytes=m.kv_bytes,
                   weights_bytes=m.weights_bytes, compute_bytes=m.compute_bytes, check=check,
                   suggestion=nearest_fit(fits, plan.n_ctx, plan.n_parallel))
