"""The budget as a gate: will these settings fit the memory free right now, and if not, what would.

Pure functions over a Budget (what the settings need, per device) and the free bytes of each device (read by
the caller at its edge: server/hardware/available.py). The refusal quotes the plan's own numbers and the
nearest settings that fit, so the user can act on it: "32 x 3,125,000 tokens need 2.2 TiB of KV cache ...;
23.0 GiB free; --n-ctx 65536 fits".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quantize.budget.types import Budget
from quantize.model.units import GIB, MIB

# Room left for what no model predicts (the CUDA context's growth, the allocator, the gateway itself).
GATE_HEADROOM_FRACTION = 0.05
SMALLEST_N_CTX = 256


def human(n_bytes: int) -> str:
    for unit, size in (("TiB", 1024 * GIB), ("GiB", GIB), ("MiB", MIB)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes} B"


@dataclass(frozen=True)
class FitCheck:
    """The verdict for one set of settings against the free memory of each device."""

    fits: bool
    device: str  # the device that decides (the fullest one)
    needed_bytes: int
    free_bytes: int

    @property
    def short(self) -> str:
        return f"{human(self.needed_bytes)} needed, {human(self.free_bytes)} free on {self.device}"


def needs(budget: Budget) -> list[int]:
    """Bytes per device: one per GPU, or the host's for the CPU."""
    return [g.total_bytes for g in budget.per_gpu] if budget.per_gpu else [budget.total_bytes]


def check_fit(budget: Budget, free: Sequence[tuple[str, int]],
              headroom_fraction: float = GATE_HEADROOM_FRACTION) -> FitCheck:
    """Whether every device's share of `budget` fits its free memory (with headroom)."""
    return check_fit_bytes(needs(budget), free, headroom_fraction)


def check_fit_bytes(needed: Sequence[int], free: Sequence[tuple[str, int]],
                    headroom_fraction: float = GATE_HEADROOM_FRACTION) -> FitCheck:
    """Whether each device's need fits its free memory (with headroom). `free` is (device, free bytes) in
    device order; a need for more devices than `free` lists cannot fit."""
    checks = []
    for i, need in enumerate(needed):
        if i >= len(free):
            checks.append(FitCheck(False, f"device {i} (not present)", need, 0))
            continue
        device, free_bytes = free[i]
        checks.append(FitCheck(need <= free_bytes * (1 - headroom_fraction), device, need, free_bytes))
    # The device that decides: the one furthest short, else the one with the least to spare.
    failing = [c for c in checks if not c.fits]
    return max(failing or checks, key=lambda c: c.needed_bytes - c.free_bytes)


def nearest_fit(
    fits: Callable[[int, int], bool], n_ctx: int, n_parallel: int, *, smallest_n_ctx: int = SMALLEST_N_CTX
) -> tuple[int, int] | None:
    """The settings closest to (n_ctx, n_parallel) that fit: the largest n_ctx (halving, then bisecting to a
    multiple of 256) at the same n_parallel; failing that, fewer sequences at the smallest context. None: not
    even one sequence of `smallest_n_ctx` tokens fits."""
    lo = min(n_ctx, smallest_n_ctx)
    if fits(lo, n_parallel):
        hi = n_ctx
        while hi - lo > 256:  # the largest multiple of 256 that fits, by bisection
            mid = (lo + hi) // 2 // 256 * 256
            if mid <= lo:
                break
            lo, hi = (mid, hi) if fits(mid, n_parallel) else (lo, mid)
        return lo, n_parallel
    for parallel in range(n_parallel - 1, 0, -1):
        if fits(lo, parallel):
            return lo, parallel
    return None


def refusal(*, n_parallel: int, n_ctx: int, kv_type: str, kv_bytes: int, weights_bytes: int,
            compute_bytes: int, check: FitCheck, suggestion: tuple[int, int] | None) -> str:
    """The message for settings that do not fit: what they need, what is free, what would fit."""
    kv = f"{n_parallel} x {n_ctx:,} tokens need {human(kv_bytes)} of KV cache ({kv_type})"
    rest = f"weights {human(weights_bytes)}, compute {human(compute_bytes)}"
    head = f"does not fit: {kv}, {rest}: {check.short}"
    if suggestion is None:
        return f"{head}; not even one sequence of {SMALLEST_N_CTX} tokens fits (a smaller quantization?)"
    fit_ctx, fit_parallel = suggestion
    fix = f"--n-ctx {fit_ctx}" + (f" --n-parallel {fit_parallel}" if fit_parallel != n_parallel else "")
    return f"{head}; {fix} fits (--force starts anyway)"


def budget_refusal(budget: Budget, check: FitCheck, suggestion: tuple[int, int] | None) -> str:
    return refusal(n_parallel=budget.n_parallel, n_ctx=budget.n_ctx, kv_type=budget.kv_type,
                   kv_bytes=budget.kv_bytes, weights_bytes=budget.weights_bytes,
                   compute_bytes=budget.compute_bytes, check=check, suggestion=suggestion)
