"""The tuner's judgements as pure functions: settings, SLO verdicts, goodput and the choice.

They say which settings a tune may try, whether a load run met the SLOs, a setting's goodput, and which
measured setting to keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loadtest.summary import LoadSummary
from server.engine.config import NCtx


class Setting(BaseModel):
    """One server setting, in edgeserve's names: sequences decoded together (n_parallel; llama-server -np,
    SGLang --max-running-requests), the context of one sequence (n_ctx), the logical batch (n_batch; SGLang
    --chunked-prefill-size) and the physical batch (n_ubatch, llama.cpp -ub)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_parallel: int = Field(ge=1, le=4096)
    n_ctx: NCtx
    n_batch: int = Field(default=2048, ge=1)
    n_ubatch: int = Field(default=512, ge=1)

    @property
    def n_ctx_total(self) -> int:
        return self.n_ctx * self.n_parallel

    @property
    def label(self) -> str:
        return f"np{self.n_parallel} ctx{self.n_ctx} b{self.n_batch} ub{self.n_ubatch}"

    def values(self) -> dict[str, Any]:
        """The settings as profile keys (what a tuned profile holds)."""
        return self.model_dump()


class Slo(BaseModel):
    """What a load run must meet to count for goodput; choosing among settings uses the same limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_ttft_p95_ms: float | None = Field(default=None, gt=0, description="None: no limit")
    max_itl_p95_ms: float | None = Field(default=None, gt=0, description="None: no limit")
    max_e2e_p95_ms: float | None = Field(default=None, gt=0, description="None: no limit")
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    min_requests: int = Field(default=1, ge=1, description="fewer finished requests: too little evidence")
    tie_tolerance: float = Field(
        default=0.03, ge=0.0, lt=1.0,
        description="goodputs within this share of the best count as equal (measurements are noisy)",
    )

    def describe(self) -> str:
        parts = [f"{name} <= {limit:.0f} ms" for name, limit in (
            ("TTFT p95", self.max_ttft_p95_ms), ("ITL p95", self.max_itl_p95_ms),
            ("E2E p95", self.max_e2e_p95_ms)) if limit is not None]
        return ", ".join([*parts, f"errors <= {self.max_error_rate:.1%}"])


class Load(BaseModel):
    """The load one Locust run offers: `users` in a closed loop, paced to `rate_rps` requests/s in all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    users: int = Field(ge=1)
    rate_rps: float | None = Field(default=None, gt=0, description="None: as fast as the users go")

    @property
    def label(self) -> str:
        return f"{self.users} users" + ("" if self.rate_rps is None else f" at {self.rate_rps:.3g} req/s")


class LoadPoint(BaseModel):
    """One Locust run against one setting: what it offered and what it measured (None: it did not run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    load: Load
    summary: LoadSummary | None = None
    failure: str | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> LoadPoint:
        if self.summary is None and not self.failure:
            raise ValueError("a load point without a summary needs a failure reason")
        return self


class Trial(BaseModel):
    """A setting started once and loaded at one or more points (empty with `failure` when it never served)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    setting: Setting
    points: tuple[LoadPoint, ...] = ()
    failure: str | None = Field(default=None, description="why the server did not come up")
    memory_bytes: int | None = Field(default=None, ge=0, description="measured: GPU memory, or RSS (CPU)")
    memory_kind: str | None = Field(default=None, description="what memory_bytes counts: gpu | rss")
    predicted_bytes: int | None = Field(default=None, ge=0, description="the VRAM calculator's figure")
    host_load_1m: float | None = Field(default=None, ge=0, description="load average before the server began")

    @model_validator(mode="after")
    def _one_outcome(self) -> Trial:
        if not self.points and not self.failure:
            raise ValueError("a trial without load points needs a failure reason")
        return self

    @property
    def runs(self) -> int:
        """Locust runs this trial took."""
        return len(self.points)

    @property
    def peak(self) -> LoadSummary | None:
        """The first point's summary: the unpaced run at full concurrency, the setting's capacity."""
        return self.points[0].summary if self.points else None


class Skipped(BaseModel):
    """A setting never started: it does not fit the card by the VRAM calculator, or a request does not fit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    setting: Setting
    why: str
    predicted_bytes: int | None = Field(default=None, ge=0)


def expand_grid(parallels: Iterable[int], ctxs: Iterable[int], batches: Iterable[int] = (2048,),
                ubatches: Iterable[int] = (512,)) -> tuple[Setting, ...]:
    """Every combination, in a stable order (n_parallel fastest), without duplicates; a physical batch
    larger than the logical one is left out (llama.cpp caps -ub at -b)."""
    axes = [sorted(set(v)) for v in (parallels, ctxs, batches, ubatches)]
    if not all(axes):
        raise ValueError("need at least one value of n_parallel, n_ctx, n_batch and n_ubatch")
    p_values, c_values, b_values, ub_values = axes
    return tuple(Setting(n_parallel=p, n_ctx=c, n_batch=b, n_ubatch=ub)
                 for c in c_values for b in b_values for ub in ub_values if ub <= b for p in p_values)


def violations(point: LoadPoint, slo: Slo) -> tuple[str, ...]:
    """Every SLO this load point missed, in words; empty when it met them all."""
    s = point.summary
    if s is None:
        return (f"did not run: {point.failure}",)
    reasons: list[str] = []
    if s.requests_ok < slo.min_requests:
        reasons.append(f"only {s.requests_ok} requests finished (need {slo.min_requests})")
    if s.error_rate > slo.max_error_rate:
        reasons.append(f"error rate {s.error_rate:.1%} > {slo.max_error_rate:.1%}")
    for name, limit, value in (("TTFT p95", slo.max_ttft_p95_ms, s.ttft_p95_ms),
                               ("ITL p95", slo.max_itl_p95_ms, s.itl_p95_ms),
                               ("E2E p95", slo.max_e2e_p95_ms, s.e2e_p95_ms)):
        if limit is None:
            continue
        if value is None:
            reasons.append(f"no {name} measured (no streamed requests)")
        elif value > limit:
            reasons.append(f"{name} {value:.0f} ms > {limit:.0f} ms")
    return tuple(reasons)


def best_point(trial: Trial, slo: Slo) -> LoadPoint | None:
    """The load point with the most finished requests per second among those that met the SLOs."""
    good = [p for p in trial.points if p.summary is not None and not violations(p, slo)]
    return max(good, key=lambda p: p.summary.requests_per_s if p.summary else 0.0, default=None)


def goodput(trial: Trial, slo: Slo) -> float:
    """Requests per second the setting served while meeting the SLOs (0 when no load point met them)."""
    point = best_point(trial, slo)
    return point.summary.requests_per_s if point is not None and point.summary is not None else 0.0


class Choice(BaseModel):
    """The tuner's answer: the best trial by goodput, or None with the reason nothing qualified."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    best: Trial | None
    goodput_rps: float = 0.0
    reason: str


def _ttft_at_best(trial: Trial, slo: Slo) -> float:
    point = best_point(trial, slo)
    p95 = point.summary.ttft_p95_ms if point is not None and point.summary is not None else None
    return float("inf") if p95 is None else p95


# How many skipped settings a "nothing was tried" answer names; the report lists them all.
SKIPPED_LISTED = 8


def nothing_tried(skipped: Sequence[Skipped]) -> str:
    """Why a tune measured nothing, in words: each skipped setting with the reason it was not started."""
    if not skipped:
        return "no settings were tried"
    listed = "; ".join(f"{s.setting.label}: {s.why}" for s in skipped[:SKIPPED_LISTED])
    more = len(skipped) - SKIPPED_LISTED
    which = "the only setting was" if len(skipped) == 1 else f"all {len(skipped)} settings were"
    return (f"no settings were tried: {which} skipped before starting ({listed}"
            + (f"; and {more} more, listed in report.md" if more > 0 else "") + ")")


def choose(trials: Sequence[Trial], slo: Slo, skipped: Sequence[Skipped] = ()) -> Choice:
    """The trial with the highest goodput (`skipped`: the settings never started, named when nothing ran).

    Goodputs within `tie_tolerance` of the best count as equal (measurement noise); among those the longest
    context wins (what a user can send), then the lowest TTFT p95, then fewer sequences, then less memory.
    """
    if not trials:
        return Choice(best=None, reason=nothing_tried(skipped))
    scored = [(goodput(t, slo), t) for t in trials]
    top = max(g for g, _ in scored)
    if top <= 0:
        return Choice(best=None, reason=f"none of the {len(trials)} settings met the SLOs ({slo.describe()})")
    floor = top * (1.0 - slo.tie_tolerance)
    contenders = [(g, t) for g, t in scored if g >= floor]
    g, best = min(contenders, key=lambda gt: (-gt[1].setting.n_ctx, _ttft_at_best(gt[1], slo),
                                               gt[1].setting.n_parallel, gt[1].memory_bytes or 0))
    reason = f"highest goodput meeting the SLOs: {g:.3g} req/s ({slo.describe()})"
    if len(contenders) > 1:
        reason += (f"; {len(contenders)} settings within {slo.tie_tolerance:.0%} of {top:.3g} req/s: the "
                   "longest context, then the lowest TTFT p95 kept")
    return Choice(best=best, goodput_rps=g, reason=reason)
