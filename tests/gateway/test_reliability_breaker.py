"""The circuit breaker: opens after N consecutive failures, lets one probe through after the cooldown."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.gateway.breaker import BreakerSettings, CircuitBreaker


class Clock:
    """A clock the test moves by hand (the breaker's only dependency on time)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, cooldown_s: float = 5.0) -> tuple[CircuitBreaker, Clock, list[tuple[str, str]]]:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker("primary", BreakerSettings(failure_threshold=threshold, cooldown_s=cooldown_s),
                             clock=clock, on_change=lambda name, old, new: changes.append((old, new)))
    return breaker, clock, changes


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker, _, changes = make(threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow() and not breaker.can_try()
    assert changes == [("closed", "open")]


def test_success_resets_the_count() -> None:
    breaker, _, _ = make(threshold=2)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 1


def test_half_open_after_cooldown_lets_exactly_one_probe() -> None:
    breaker, clock, changes = make(threshold=1, cooldown_s=5.0)
    breaker.record_failure()
    clock.now += 4.9
    assert not breaker.allow()
    assert breaker.seconds_until_probe() == pytest.approx(0.1)
    clock.now += 0.2
    assert breaker.state == "half_open"
    assert breaker.allow()          # the probe
    assert not breaker.allow()      # everyone else waits for its verdict
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_probe_opens_again_for_a_full_cooldown() -> None:
    breaker, clock, changes = make(threshold=1, cooldown_s=2.0)
    breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    assert changes[-2:] == [("half_open", "open"), ("open", "half_open")]


def test_abandoned_probe_gives_its_turn_back() -> None:
    breaker, clock, _ = make(threshold=1, cooldown_s=1.0)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.release_probe()
    assert breaker.allow()


def test_trip_opens_at_once() -> None:
    breaker, _, changes = make(threshold=5)
    breaker.trip()
    assert breaker.state == "open" and not breaker.allow()
    assert changes == [("closed", "open")]


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValidationError):
        BreakerSettings(cooldown_s=0)
