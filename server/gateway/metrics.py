"""Prometheus metrics, one CollectorRegistry per app, so several apps can share a process (tests do).

Request-path figures are observed as requests go; engine, queue and GPU figures are read at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.gateway.admission import Admission
from server.gateway.backends.base import Backend, BackendStats, ReportsStats
from server.hardware.detect import GpuSample

log = logging.getLogger(__name__)

PREFIX = "edgeserve"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

GpuSampler = Callable[[], Iterable[GpuSample]]


def _histogram_from_counts(name: str, doc: str, counts: Mapping[int, int],
                           bounds: tuple[int, ...]) -> HistogramMetricFamily:
    """Turn {value: times seen} into a cumulative Prometheus histogram."""
    buckets: list[tuple[str, float]] = []
    for bound in bounds:
        buckets.append((str(float(bound)), float(sum(c for v, c in counts.items() if v <= bound))))
    buckets.append(("+Inf", float(sum(counts.values()))))
    total = float(sum(v * c for v, c in counts.items()))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class _LiveCollector(Collector):
    """Reads queue, engine and GPU state at scrape time."""

    def __init__(self, admission: Callable[[], Admission | None], backend: Callable[[], Backend | None],
                 gpu_sampler: GpuSampler | None) -> None:
        self._admission = admission
        self._backend = backend
        self._gpu_sampler = gpu_sampler

    def collect(self) -> Iterator[Metric]:
        admission = self._admission()
        if admission is not None:
            snap = admission.snapshot()
            yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a slot",
                                    value=snap.waiting)
            yield GaugeMetricFamily(f"{PREFIX}_requests_in_flight", "Requests admitted and running",
                                    value=snap.in_flight)
            yield GaugeMetricFamily(f"{PREFIX}_slots", "Requests that may run at once", value=snap.limit)
        backend = self._backend()
        if backend is not None:
            ready = GaugeMetricFamily(f"{PREFIX}_backend_ready", "1 when the backend can take work",
                                      labels=["backend"])
            ready.add_metric([backend.name], 1.0 if backend.is_ready() else 0.0)
            yield ready
            if isinstance(backend, ReportsStats):
                try:
                    stats = backend.stats()
                except Exception:  # a scrape must never fail because the engine is busy or gone
                    log.debug("backend stats unavailable", exc_info=True)
                else:
                    yield from self._engine(stats)
        if self._gpu_sampler is not None:
            yield from self._gpus()

    def _engine(self, stats: BackendStats) -> Iterator[Metric]:
        if stats.running is not None:
            yield GaugeMetricFamily(f"{PREFIX}_engine_running_sequences", "Sequences in the decode batch",
                                    value=stats.running)
        if stats.waiting is not None:
            yield GaugeMetricFamily(f"{PREFIX}_engine_waiting_sequences",
                                    "Sequences waiting inside the engine", value=stats.waiting)
        if stats.kv_usage_ratio is not None:
            yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio", "Share of KV cache cells in use",
                                    value=stats.kv_usage_ratio)
        if stats.kv_used_cells is not None:
            yield GaugeMetricFamily(f"{PREFIX}_kv_cache_used_cells", "KV cache cells in use",
                                    value=stats.kv_used_cells)
        if stats.preemptions_total is not None:
            yield CounterMetricFamily(f"{PREFIX}_preemptions", "Sequences preempted for lack of KV cache",
                                      value=stats.preemptions_total)
        if stats.steps_total is not None:
            yield CounterMetricFamily(f"{PREFIX}_engine_steps", "Engine decode steps",
                                      value=stats.steps_total)
        if stats.prefix_reused_tokens_total is not None:
            yield CounterMetricFamily(f"{PREFIX}_prefix_reused_tokens",
                                      "Prompt tokens taken from a cached prefix instead of being computed",
                                      value=stats.prefix_reused_tokens_total)
        if stats.sampled_in_graph_total is not None:
            yield CounterMetricFamily(f"{PREFIX}_engine_sampled_in_graph_tokens",
                                      "Tokens sampled inside llama.cpp's decode graph (not on the host)",
                                      value=stats.sampled_in_graph_total)
        yield from self._speculation(stats)
        if stats.step_seconds:
            phases = CounterMetricFamily(f"{PREFIX}_engine_step_seconds",
                                         "Time per step phase: the engine core's loop "
                                         "(server.engine.step_profile) and the front reading it (front_*)",
                                         labels=["phase"])
            for phase, seconds in stats.step_seconds.items():
                phases.add_metric([phase], seconds)
            yield phases
        if stats.batch_size_steps:
            yield _histogram_from_counts(f"{PREFIX}_engine_batch_size", "Sequences decoded per engine step",
                                         stats.batch_size_steps, BATCH_BUCKETS)
        if stats.step_tokens_steps:
            yield _histogram_from_counts(f"{PREFIX}_engine_step_tokens", "Tokens (decode + prefill) per step",
                                         stats.step_tokens_steps, STEP_TOKEN_BUCKETS)

    @staticmethod
    def _speculation(stats: BackendStats) -> Iterator[Metric]:
        """Speculative decoding: drafted and accepted tokens, their ratio, and tokens per sequence-step (1.0
        without speculation)."""
        if stats.spec_drafted_total is not None and stats.spec_accepted_total is not None:
            drafted, accepted = stats.spec_drafted_total, stats.spec_accepted_total
            yield CounterMetricFamily(f"{PREFIX}_spec_drafted_tokens", "Draft tokens verified by the model",
                                      value=drafted)
            yield CounterMetricFamily(f"{PREFIX}_spec_accepted_tokens", "Draft tokens the model accepted",
                                      value=accepted)
            yield GaugeMetricFamily(f"{PREFIX}_spec_acceptance_ratio",
                                    "Accepted / drafted tokens, since start",
                                    value=accepted / drafted if drafted else 0.0)
        if stats.seq_steps_total and stats.generated_tokens_total is not None:
            yield GaugeMetricFamily(f"{PREFIX}_engine_tokens_per_step",
                                    "Generated tokens per sequence per engine step, since start",
                                    value=stats.generated_tokens_total / stats.seq_steps_total)

    def _gpus(self) -> Iterator[Metric]:
        assert self._gpu_sampler is not None
        try:
            samples = tuple(self._gpu_sampler())
        except Exception:
            log.debug("GPU sampling failed", exc_info=True)
            return
        if not samples:
            return
        labels = ["gpu", "name"]
        memory_used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
        memory_total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory", labels=labels)
        utilization = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_ratio", "GPU busy share", labels=labels)
        temperature = GaugeMetricFamily(f"{PREFIX}_gpu_temperature_celsius", "GPU temperature", labels=labels)
        power = GaugeMetricFamily(f"{PREFIX}_gpu_power_watts", "GPU board power draw", labels=labels)
        for sample in samples:
            key = [str(sample.index), sample.name]
            memory_used.add_metric(key, float(sample.memory_used_bytes))
            memory_total.add_metric(key, float(sample.memory_total_bytes))
            if sample.utilization_gpu_pct is not None:
                utilization.add_metric(key, sample.utilization_gpu_pct / 100.0)
            if sample.temperature_c is not None:
                temperature.add_metric(key, float(sample.temperature_c))
            if sample.power_draw_w is not None:
                power.add_metric(key, float(sample.power_draw_w))
        yield from (memory_used, memory_total, utilization, temperature, power)


class GatewayMetrics:
    """The app's metrics. Route handlers call the observe_* methods; /metrics calls render()."""

    def __init__(self, gpu_sampler: GpuSampler | None = None) -> None:
        self.registry = CollectorRegistry()
        self._admission: Admission | None = None
        self._backend: Backend | None = None
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from request to first token",
                              ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between streamed deltas",
                             ["route"], buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "End-to-end generation request latency",
                             ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time spent waiting for a slot",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", registry=r)
        self.rejected = Counter(f"{PREFIX}_rejected_requests", "Requests refused before running, by reason",
                                ["reason"], registry=r)
        self.cancelled = Counter(f"{PREFIX}_cancelled_requests", "Requests the client abandoned", registry=r)
        r.register(_LiveCollector(lambda: self._admission, lambda: self._backend, gpu_sampler))

    def bind(self, admission: Admission | None, backend: Backend | None) -> None:
        """Point the scrape-time collector at the live admission gate and backend."""
        self._admission = admission
        self._backend = backend

    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def observe_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens > 0:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens > 0:
            self.generated_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template and status (unknown paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(path, status)
