"""Prometheus figures of the fallback chain: fallbacks, retries, failures, breaker changes, ladder steps.

Counters are registered in the app's own registry (GatewayMetrics.registry) when the app binds the chain;
per-backend gauges (breaker state, availability, slots in use, queue depth) are read at scrape time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "edgeserve"
BREAKER_STATE_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


@dataclass(frozen=True)
class MemberSnapshot:
    """One backend of the chain as /metrics shows it."""

    name: str
    breaker_state: str
    is_available: bool
    in_flight: int
    waiting: int
    slots: int


class _ChainCollector(Collector):
    def __init__(self, snapshots: Callable[[], Iterable[MemberSnapshot]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        labels = ["backend"]
        breaker = GaugeMetricFamily(f"{PREFIX}_breaker_state",
                                    "Breaker per backend: 0 closed, 1 half-open, 2 open", labels=labels)
        available = GaugeMetricFamily(f"{PREFIX}_chain_backend_available",
                                      "1 when the chain would send new work here", labels=labels)
        in_flight = GaugeMetricFamily(f"{PREFIX}_chain_backend_in_flight", "Requests running on this backend",
                                      labels=labels)
        waiting = GaugeMetricFamily(f"{PREFIX}_chain_backend_queue_depth",
                                    "Requests waiting for one of this backend's slots", labels=labels)
        slots = GaugeMetricFamily(f"{PREFIX}_chain_backend_slots", "Slots of this backend", labels=labels)
        for snap in self._snapshots():
            breaker.add_metric([snap.name], BREAKER_STATE_VALUE.get(snap.breaker_state, -1.0))
            available.add_metric([snap.name], 1.0 if snap.is_available else 0.0)
            in_flight.add_metric([snap.name], float(snap.in_flight))
            waiting.add_metric([snap.name], float(snap.waiting))
            slots.add_metric([snap.name], float(snap.slots))
        yield from (breaker, available, in_flight, waiting, slots)


class ChainMetrics:
    """Counters of the fallback chain. Lives in a private registry until `bind()` moves it to the app's."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.fallbacks = Counter(
            f"{PREFIX}_fallbacks", "Requests moved to another backend, by phase (before_output: retried "
            "transparently; mid_stream: resumed with the text sent so far)",
            ["from_backend", "to_backend", "phase"], registry=r)
        self.failures = Counter(f"{PREFIX}_backend_failures", "Backend failures seen by the chain, by reason",
                                ["backend", "reason"], registry=r)
        self.attempts = Counter(f"{PREFIX}_backend_attempts", "Requests (or resumed parts) sent to a backend",
                                ["backend"], registry=r)
        self.breaker_transitions = Counter(f"{PREFIX}_breaker_transitions", "Circuit breaker state changes",
                                           ["backend", "to_state"], registry=r)
        self.refused = Counter(f"{PREFIX}_chain_refused", "Requests the chain could not place, by reason",
                               ["reason"], registry=r)
        self.ladder_steps = Counter(f"{PREFIX}_ladder_steps", "OOM ladder steps of restarted backends",
                                    ["backend", "rung"], registry=r)
        self._collector: _ChainCollector | None = None

    def watch(self, snapshots: Callable[[], Iterable[MemberSnapshot]]) -> None:
        """Report per-backend gauges from `snapshots` at scrape time."""
        self._collector = _ChainCollector(snapshots)
        self.registry.register(self._collector)


async def watch_supervisors(status_files: Mapping[str, Path], record: Callable[[str, str, str], None],
                            interval_s: float = 1.0) -> None:
    """Call `record(backend, rung, detail)` once for every OOM-ladder step a supervisor writes to its status
    file (server.launch.supervisor: "ladder_steps"), so each step is a metric and a log line here too."""
    seen: dict[str, int] = {}
    while True:
        for name, path in status_files.items():
            try:
                status = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            steps = (status.get("ladder_steps") or []) if isinstance(status, dict) else []
            for step in steps[seen.get(name, 0):]:
                if isinstance(step, dict):
                    change = f"{step.get('setting')} {step.get('old')} -> {step.get('new')}"
                    record(name, str(step.get("rung", "unknown")), f"{change}: {step.get('why')}")
            seen[name] = len(steps)
        await asyncio.sleep(interval_s)
