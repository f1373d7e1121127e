"""The tuner's decisions as pure functions: which settings to try, and which measured one to keep."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loadtest.summary import LoadSummary
from server.engine.config import NCtx


class Setting(BaseModel):
    """One server setting: sequences decoded together (n_parallel, llama-server -np) and the context of one
    sequence (n_ctx); the KV pool is their product (n_ctx_total, llama-server's -c)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_parallel: int = Field(ge=1, le=1024)
    n_ctx: NCtx

    @property
    def n_ctx_total(self) -> int:
        return self.n_ctx * self.n_parallel

    @property
    def label(self) -> str:
        return f"n_parallel={self.n_parallel} n_ctx={self.n_ctx}"


class Constraint(BaseModel):
    """What a setting must meet to be chosen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_ttft_p95_ms: float | None = Field(default=None, gt=0, description="None: no latency limit")
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    min_requests: int = Field(default=1, ge=1, description="fewer finished requests: too little evidence")
    tie_tolerance: float = Field(
        default=0.03, ge=0.0, lt=1.0,
        description="throughputs within this share of the best count as equal; the lower TTFT p95 wins",
    )


class Trial(BaseModel):
    """A setting and what happened when it was load-tested (summary None when it never got to run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    setting: Setting
    users: int = Field(ge=1)
    summary: LoadSummary | None = None
    failure: str | None = Field(default=None, description="why the server or Locust did not run")
    gpu_memory_used_bytes: int | None = Field(default=None, ge=0, description="from /metrics after the run")
    host_load_1m: float | None = Field(default=None, ge=0, description="load average before the server began")

    @model_validator(mode="after")
    def _one_outcome(self) -> Trial:
        if self.summary is None and not self.failure:
            raise ValueError("a trial without a summary needs a failure reason")
        return self


class Verdict(BaseModel):
    """Whether one trial meets the constraint, and if not, why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    setting: Setting
    is_feasible: bool
    reasons: tuple[str, ...] = ()


class Choice(BaseModel):
    """The tuner's answer: the best feasible trial, or None with the reason nothing qualified."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    best: Trial | None
    verdicts: tuple[Verdict, ...]
    reason: str


def expand_grid(parallels: Iterable[int], ctxs: Iterable[int]) -> tuple[Setting, ...]:
    """Every (n_parallel, n_ctx) pair, in a stable order, without duplicates."""
    p_values = sorted(set(parallels))
    c_values = sorted(set(ctxs))
    if not p_values or not c_values:
        raise ValueError("need at least one --n-parallel and one --n-ctx value")
    return tuple(Setting(n_parallel=p, n_ctx=c) for c in c_values for p in p_values)


def fits_request(setting: Setting, request_tokens: int) -> bool:
    """Whether one request (prompt + max_tokens) fits the context a sequence gets (n_ctx, whatever the
    server: the split and the unified cache alike give a sequence n_ctx tokens)."""
    return request_tokens <= setting.n_ctx


def judge(trial: Trial, constraint: Constraint) -> Verdict:
    """Check one trial against the constraint; every unmet condition is named."""
    reasons: list[str] = []
    s = trial.summary
    if s is None:
        reasons.append(f"did not run: {trial.failure}")
        return Verdict(setting=trial.setting, is_feasible=False, reasons=tuple(reasons))
    if s.requests_ok < constraint.min_requests:
        reasons.append(f"only {s.requests_ok} requests finished (need {constraint.min_requests})")
    if s.error_rate > constraint.max_error_rate:
        reasons.append(f"error rate {s.error_rate:.1%} > {constraint.max_error_rate:.1%}")
    if constraint.max_ttft_p95_ms is not None:
        p95 = s.ttft_p95_ms
        if p95 is None:
            reasons.append("no TTFT measured (non-streaming run)")
        elif p95 > constraint.max_ttft_p95_ms:
            reasons.append(f"TTFT p95 {p95:.0f} ms > {constraint.max_ttft_p95_ms:.0f} ms")
    return Verdict(setting=trial.setting, is_feasible=not reasons, reasons=tuple(reasons))


def _ttft_key(trial: Trial) -> float:
    p95 = trial.summary.ttft_p95_ms if trial.summary else None
    return float("inf") if p95 is None else p95


def choose(trials: Sequence[Trial], constraint: Constraint) -> Choice:
    """The feasible trial with the highest throughput.

    Measured throughput is noisy, so trials within `tie_tolerance` of the best are treated as equal and the
    one with the lowest TTFT p95 wins, then the one using fewer slots and less context (less memory).
    """
    verdicts = tuple(judge(t, constraint) for t in trials)
    feasible = [t for t, v in zip(trials, verdicts, strict=True) if v.is_feasible]
    if not trials:
        return Choice(best=None, verdicts=verdicts, reason="no settings were tried")
    if not feasible:
        return Choice(best=None, verdicts=verdicts,
                      reason=f"none of the {len(trials)} settings met the constraint")
    top = max(t.summary.tokens_per_s for t in feasible if t.summary)
    floor = top * (1.0 - constraint.tie_tolerance)
    contenders = [t for t in feasible if t.summary and t.summary.tokens_per_s >= floor]
    best = min(contenders, key=lambda t: (_ttft_key(t), t.setting.n_parallel, t.setting.n_ctx))
    assert best.summary is not None
    reason = f"highest throughput meeting the constraint: {best.summary.tokens_per_s:.1f} tokens/s"
    if len(contenders) > 1:
        reason += (f" ({len(contenders)} settings within {constraint.tie_tolerance:.0%} of {top:.1f} "
                   "tokens/s; lowest TTFT p95 kept)")
    return Choice(best=best, verdicts=verdicts, reason=reason)
