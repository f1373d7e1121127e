"""What one Locust run measured: raw samples from the locustfile and the figures derived from them."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

MAX_ERROR_KINDS = 20


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between ranks as numpy does; None if empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


class Derived(BaseModel):
    """A model whose JSON also carries its computed fields, for people reading it; reading the JSON back
    recomputes them instead of taking them as inputs."""

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in cls.model_computed_fields}
        return data


class LoadSummary(Derived):
    """Samples of one run.

    Throughput counts only tokens generated inside the measured window (from the start of the run to the
    moment it was told to stop), so requests draining afterwards, or cut off, add just their in-window tokens.
    Latency, TTFT and error figures come from every request that finished, draining ones included.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    users: int = Field(ge=0)
    duration_s: float = Field(ge=0)
    requests_ok: int = Field(default=0, ge=0)
    requests_failed: int = Field(default=0, ge=0)
    requests_cut: int = Field(default=0, ge=0, description="still running when the run ended")
    requests_in_window: int = Field(default=0, ge=0, description="successes finished inside the window")
    errors: dict[str, int] = Field(default_factory=dict, description="failure message -> count")
    ttft_ms: tuple[float, ...] = ()
    e2e_ms: tuple[float, ...] = ()
    decode_tokens_per_s: tuple[float, ...] = Field(default=(), description="per request, after 1st token")
    completion_tokens: int = Field(default=0, ge=0, description="tokens of finished successful requests")
    prompt_tokens: int = Field(default=0, ge=0, description="prompt tokens the server reported in `usage`")
    window_tokens: int = Field(default=0, ge=0, description="tokens generated inside the measured window")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def requests_total(self) -> int:
        return self.requests_ok + self.requests_failed

    @computed_field  # type: ignore[prop-decorator]
    @property
    def error_rate(self) -> float:
        total = self.requests_ok + self.requests_failed
        return self.requests_failed / total if total else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tokens_per_s(self) -> float:
        """Aggregate generated tokens per second over the whole run."""
        if self.duration_s <= 0:
            return 0.0
        return self.window_tokens / self.duration_s

    @computed_field  # type: ignore[prop-decorator]
    @property
    def requests_per_s(self) -> float:
        """Successful requests finished per second inside the window (draining ones left out)."""
        return self.requests_in_window / self.duration_s if self.duration_s > 0 else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ttft_p50_ms(self) -> float | None:
        return percentile(self.ttft_ms, 50)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ttft_p95_ms(self) -> float | None:
        return percentile(self.ttft_ms, 95)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def e2e_p50_ms(self) -> float | None:
        return percentile(self.e2e_ms, 50)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def e2e_p95_ms(self) -> float | None:
        return percentile(self.e2e_ms, 95)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def decode_tokens_per_s_p50(self) -> float | None:
        """Median speed one client sees once its first token arrived."""
        return percentile(self.decode_tokens_per_s, 50)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def itl_p50_ms(self) -> float | None:
        """Median inter-token latency: a request's mean gap between tokens after the first (1000 / its
        decode speed)."""
        return _inverse_ms(percentile(self.decode_tokens_per_s, 50))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def itl_p95_ms(self) -> float | None:
        """The 95th percentile of the per-request inter-token latency (the 5th of the decode speeds)."""
        return _inverse_ms(percentile(self.decode_tokens_per_s, 5))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> LoadSummary:
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))


def _inverse_ms(tokens_per_s: float | None) -> float | None:
    return None if not tokens_per_s else 1000.0 / tokens_per_s


class Recorder:
    """Collects samples as requests finish (Locust users are greenlets of one thread: no locking needed)."""

    def __init__(self) -> None:
        self.ok = 0
        self.ok_in_window = 0
        self.failed = 0
        self.cut = 0
        self.errors: dict[str, int] = {}
        self.ttft_ms: list[float] = []
        self.e2e_ms: list[float] = []
        self.decode_tps: list[float] = []
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.window_tokens = 0

    def success(self, *, ttft_ms: float | None, e2e_ms: float, completion_tokens: int,
                window_tokens: int | None = None, prompt_tokens: int = 0) -> None:
        """A finished request. `window_tokens` were generated inside the window; None: it finished there."""
        self.ok += 1
        self.e2e_ms.append(e2e_ms)
        self.completion_tokens += completion_tokens
        self.prompt_tokens += prompt_tokens
        if window_tokens is None:
            self.ok_in_window += 1
            self.window_tokens += completion_tokens
        else:
            self.window_tokens += window_tokens
        if ttft_ms is not None:
            self.ttft_ms.append(ttft_ms)
            decode_s = (e2e_ms - ttft_ms) / 1000.0
            if completion_tokens > 1 and decode_s > 0:
                self.decode_tps.append((completion_tokens - 1) / decode_s)

    def failure(self, message: str) -> None:
        self.failed += 1
        key = message[:200]
        if key in self.errors or len(self.errors) < MAX_ERROR_KINDS:
            self.errors[key] = self.errors.get(key, 0) + 1
        else:
            self.errors["(other)"] = self.errors.get("(other)", 0) + 1

    def cut_off(self, window_tokens: int) -> None:
        """A request still running when the run ended: only its in-window tokens count."""
        self.cut += 1
        self.window_tokens += window_tokens

    def summary(self, *, users: int, duration_s: float) -> LoadSummary:
        return LoadSummary(
            users=users, duration_s=duration_s, requests_ok=self.ok, requests_failed=self.failed,
            requests_cut=self.cut, requests_in_window=self.ok_in_window, errors=dict(self.errors),
            ttft_ms=tuple(self.ttft_ms), e2e_ms=tuple(self.e2e_ms),
            decode_tokens_per_s=tuple(self.decode_tps), completion_tokens=self.completion_tokens,
            prompt_tokens=self.prompt_tokens, window_tokens=self.window_tokens,
        )
