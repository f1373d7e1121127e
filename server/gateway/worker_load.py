"""How busy this gateway is, in the terms a router in front of several replicas compares them by.

SGLang reports a worker's load as tokens: KV cells in use plus the prompt tokens of requests still waiting
(`num_total_tokens` in /v1/loads, `num_tokens` in the older /get_load). edgeserve counts the same way where
it can: the engine's KV cells in use, and one sequence's context (n_ctx) for every request admitted but not
yet running or waiting for a slot, since such a request will hold at least that much of a small box's pool
before it finishes and the gateway has not tokenized it yet. A backend that reports no KV figure (a remote
llama-server) counts n_ctx per running request too. The unit is the same on every replica of one cluster, so
a router comparing two of them (power_of_two) picks the one with more room.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.gateway.admission import AdmissionSnapshot
from server.gateway.backends.base import BackendStats


@dataclass(frozen=True)
class WorkerLoad:
    """One replica's load (one data-parallel rank: edgeserve has one scheduler per gateway)."""

    running: int
    waiting: int
    used_tokens: int
    total_tokens: int
    max_total_tokens: int
    max_running: int

    @property
    def token_usage(self) -> float:
        return min(1.0, self.used_tokens / self.max_total_tokens) if self.max_total_tokens else 0.0

    def as_get_load(self) -> list[dict[str, int]]:
        """SGLang's /get_load body: one entry per data-parallel rank."""
        return [{"dp_rank": 0, "num_reqs": self.running, "num_waiting_reqs": self.waiting,
                 "num_tokens": self.total_tokens}]

    def as_v1_loads(self) -> dict[str, object]:
        """SGLang's /v1/loads body (its `core` section, the part routers read)."""
        return {"loads": [{"dp_rank": 0, "num_running_reqs": self.running, "num_waiting_reqs": self.waiting,
                           "num_used_tokens": self.used_tokens, "num_total_tokens": self.total_tokens,
                           "max_total_num_tokens": self.max_total_tokens,
                           "max_running_requests": self.max_running,
                           "token_usage": round(self.token_usage, 4)}]}


def worker_load(admission: AdmissionSnapshot, stats: BackendStats, n_ctx: int) -> WorkerLoad:
    """The load of a gateway whose admission gate and backend read `admission` and `stats` (pure)."""
    # Requests the engine holds but has not scheduled are admitted (in_flight) yet not in its batch.
    engine_waiting = stats.waiting or 0
    running = max(0, admission.in_flight - engine_waiting)
    waiting = admission.waiting + engine_waiting
    used = stats.kv_used_cells if stats.kv_used_cells is not None else running * n_ctx
    return WorkerLoad(
        running=running,
        waiting=waiting,
        used_tokens=used,
        total_tokens=used + waiting * n_ctx,
        max_total_tokens=stats.kv_total_cells or admission.limit * n_ctx,
        max_running=admission.limit,
    )
