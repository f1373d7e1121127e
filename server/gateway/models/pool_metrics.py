"""Prometheus figures of the model pool, per model: state, loads, evictions, load seconds, memory.

Counters live in the pool's own registry until the app binds the pool (create_app calls `bind_registry`);
states and memory are read from the pool at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.gateway.models.member import MODEL_STATES, Member


class PoolView(Protocol):
    """What the figures are read from (the pool)."""

    @property
    def members(self) -> Mapping[str, Member]: ...

    @property
    def budget_bytes(self) -> int: ...

PREFIX = "edgeserve"
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class _PoolCollector(Collector):
    def __init__(self, pool: PoolView) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(f"{PREFIX}_model_state", "1 for the state each model is in",
                                  labels=["model", "state"])
        planned = GaugeMetricFamily(f"{PREFIX}_model_planned_bytes",
                                    "Memory the plan says the model holds when resident", labels=["model"])
        resident = GaugeMetricFamily(f"{PREFIX}_model_resident_bytes",
                                     "Planned memory of the model while it holds memory (0 when unloaded)",
                                     labels=["model"])
        in_flight = GaugeMetricFamily(f"{PREFIX}_model_in_flight", "Requests running on the model",
                                      labels=["model"])
        budget = GaugeMetricFamily(f"{PREFIX}_models_budget_bytes",
                                   "Memory the resident models may plan for together")
        for m in self._pool.members.values():
            for s in MODEL_STATES:
                state.add_metric([m.name, s], 1.0 if m.state == s else 0.0)
            planned.add_metric([m.name], float(m.planned_bytes))
            resident.add_metric([m.name], float(m.planned_bytes if m.holds_memory else 0))
            in_flight.add_metric([m.name], float(m.in_flight))
        budget.add_metric([], float(self._pool.budget_bytes))
        yield from (state, planned, resident, in_flight, budget)


class PoolMetrics:
    """Counters of the pool, and the collector of its gauges."""

    def __init__(self, pool: PoolView) -> None:
        self._pool = pool
        self._make(CollectorRegistry())

    def _make(self, registry: CollectorRegistry) -> None:
        self.loads = Counter(f"{PREFIX}_model_loads_total", "Models loaded", ["model"], registry=registry)
        self.load_failures = Counter(f"{PREFIX}_model_load_failures_total", "Loads that failed", ["model"],
                                     registry=registry)
        self.evictions = Counter(f"{PREFIX}_model_evictions_total",
                                 "Models unloaded: lru (for another model) or idle_ttl", ["model", "reason"],
                                 registry=registry)
        self.refusals = Counter(f"{PREFIX}_model_refusals_total",
                                "Requests answered 503 because their model could not be made resident",
                                ["model", "reason"], registry=registry)
        self.load_seconds = Histogram(f"{PREFIX}_model_load_seconds", "Seconds from load start to resident",
                                      ["model"], buckets=LOAD_BUCKETS, registry=registry)
        for name in self._pool.members:
            self.loads.labels(model=name)
            self.evictions.labels(model=name, reason="lru")
            self.evictions.labels(model=name, reason="idle_ttl")

    def bind(self, registry: CollectorRegistry) -> None:
        """Move the counters into the app's registry and add the gauges there (counts so far start anew:
        binding happens before anything loads)."""
        self._make(registry)
        registry.register(_PoolCollector(self._pool))

    def loaded(self, model: str, seconds: float) -> None:
        self.loads.labels(model=model).inc()
        self.load_seconds.labels(model=model).observe(seconds)

    def load_failed(self, model: str) -> None:
        self.load_failures.labels(model=model).inc()

    def evicted(self, model: str, reason: str) -> None:
        self.evictions.labels(model=model, reason=reason).inc()

    def refused(self, model: str, reason: str) -> None:
        self.refusals.labels(model=model, reason=reason).inc()
