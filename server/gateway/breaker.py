"""A circuit breaker per backend: stop sending work to a backend that keeps failing, then probe it once.

closed    -> every request may go; `failure_threshold` consecutive failures open it.
open      -> nothing goes for `cooldown_s`; then the next request that asks becomes the one probe (half-open).
half_open -> exactly one request is in flight as the probe; its success closes the breaker, its failure opens
             it again for another cooldown.
A request that never reaches the backend (the client left, the gateway refused it) reports nothing, so a
probe that was abandoned gives its turn back with `release_probe()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]
StateListener = Callable[[str, "BreakerState", "BreakerState"], None]


class BreakerSettings(BaseModel):
    """How quickly a breaker opens and how long it stays open."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    failure_threshold: int = Field(default=3, ge=1, description="consecutive failures that open the breaker")
    cooldown_s: float = Field(default=5.0, gt=0, description="time open before one probe request may go")


class CircuitBreaker:
    """Consecutive-failure breaker with one half-open probe. Not thread-safe: use it on one event loop."""

    def __init__(self, name: str, settings: BreakerSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic, on_change: StateListener | None = None) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cooldown has passed reads as half_open)."""
        if self._state == "open" and self._cooldown_over():
            return "half_open"
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def is_closed(self) -> bool:
        return self._state == "closed"

    def seconds_until_probe(self) -> float:
        """How long until an open breaker lets its probe through (0 when it would now)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.settings.cooldown_s - self._clock())

    def can_try(self) -> bool:
        """Would `allow()` say yes now? (No side effect: use it to choose, `allow()` to commit.)"""
        if self._state == "closed":
            return True
        if self._state == "open":
            return self._cooldown_over()
        return not self._probe_out

    def allow(self) -> bool:
        """Take permission to send one request. In half-open state only one caller gets it (the probe)."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if not self._cooldown_over():
                return False
            self._set("half_open")
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def release_probe(self) -> None:
        """The probe never reached the backend: let the next request probe instead."""
        self._probe_out = False

    def record_success(self) -> None:
        self._failures = 0
        self._probe_out = False
        if self._state != "closed":
            self._set("closed")

    def record_failure(self) -> None:
        self._failures += 1
        self._probe_out = False
        if self._state == "half_open" or (
                self._state == "closed" and self._failures >= self.settings.failure_threshold):
            self._opened_at = self._clock()
            self._set("open")
        elif self._state == "open":
            # A failure seen while open (a late answer of a request sent before it opened) restarts the wait.
            self._opened_at = self._clock()

    def trip(self) -> None:
        """Open at once, whatever the count (the backend is known to be dead, e.g. it failed to start)."""
        self._failures = max(self._failures, self.settings.failure_threshold)
        self._probe_out = False
        self._opened_at = self._clock()
        if self._state != "open":
            self._set("open")

    def _cooldown_over(self) -> bool:
        return self._clock() - self._opened_at >= self.settings.cooldown_s

    def _set(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if new == "open":
            log.warning("breaker %s: %s -> open (%d consecutive failures)", self.name, old, self._failures)
        else:
            log.info("breaker %s: %s -> %s", self.name, old, new)
        if self._on_change is not None:
            self._on_change(self.name, old, new)
