"""llama-server models of a models file: one llama-server process per model, planned by `edgeserve launch`'s
planner and kept by its supervisor (health checks, restarts, the OOM ladder), seen by the pool as a backend.

This is where launch and gateway meet for the model pool: the pool (gateway) asks a `ModelKind` for a model's
planned memory and a backend; this kind answers with the launch plan's own figure and a supervised process.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

from server.gateway.backends.base import BackendUnavailableError, Delta, GenerationJob
from server.gateway.backends.openai_upstream import OpenAIUpstreamBackend
from server.gateway.models.memory_plan import Where, embedded_planned_bytes
from server.gateway.models.models_file import ModelEntry
from server.launch.plan import LaunchPlan
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.supervisor import Supervisor, SupervisorConfig

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def plan_for(entry: ModelEntry, port: int | None = None) -> LaunchPlan:
    """The launch plan of one llama-server model: the file's settings are flags (pinned, never stepped
    down), so what runs is what the pool planned for."""
    request = LaunchRequest(backend="llama-server", model_path=entry.path, host=HOST, port=port,
                            gateway=False, model_name=entry.name, **entry.settings)
    return make_plan(request)


class LlamaServerKind:
    """A llama-server process per model."""

    def planned_bytes(self, entry: ModelEntry, where: Where) -> int:
        memory = plan_for(entry).memory
        # The plan has no estimate only where it could not read the model; the engine's figure is the same
        # llama.cpp memory model.
        return memory.total_bytes if memory is not None else embedded_planned_bytes(entry, where)

    def make_backend(self, entry: ModelEntry) -> SupervisedLlamaServer:
        return SupervisedLlamaServer(entry)


class SupervisedLlamaServer:
    """One model's llama-server under its supervisor, spoken to as an OpenAI upstream."""

    name = "llama-server"

    def __init__(self, entry: ModelEntry, config: SupervisorConfig | None = None) -> None:
        self.entry = entry
        self.model_id = entry.name
        self._config = config or SupervisorConfig()
        self._supervisor: Supervisor | None = None
        self._upstream: OpenAIUpstreamBackend | None = None

    @property
    def features(self) -> Any:
        return getattr(self._upstream, "features", None)

    @property
    def n_ctx(self) -> int:
        return self._upstream.n_ctx if self._upstream is not None else 0

    @property
    def slots(self) -> int:
        return self._upstream.slots if self._upstream is not None else self.entry.n_parallel

    def is_ready(self) -> bool:
        return (self._supervisor is not None and self._supervisor.is_ready() and self._upstream is not None
                and self._upstream.is_ready())

    async def start(self) -> None:
        plan = plan_for(self.entry, _free_port())
        supervisor = Supervisor(plan, self._config, log_prefix=f"[{self.entry.name}] ")
        self._supervisor = supervisor
        supervisor.start()
        if not await asyncio.to_thread(supervisor.wait_ready, self._config.health_timeout_s):
            failure = supervisor.last_failure
            raise RuntimeError(f"llama-server for {self.entry.name} did not become ready"
                               + (f": {failure}" if failure is not None else ""))
        upstream = OpenAIUpstreamBackend(f"http://{HOST}:{plan.port}", n_parallel=plan.n_parallel,
                                         n_ctx=plan.n_ctx, model=self.entry.name, dialect_name="llama-server")
        await upstream.start()
        self._upstream = upstream

    async def stop(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            await upstream.stop()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await asyncio.to_thread(supervisor.stop)

    def count_prompt_tokens(self, job: GenerationJob) -> int | None:
        return self._upstream.count_prompt_tokens(job) if self._upstream is not None else None

    def generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        if self._upstream is None:
            raise BackendUnavailableError(f"llama-server for {self.entry.name} is not running")
        return self._upstream.generate(job)

    async def embed(self, inputs: Any) -> Any:
        if self._upstream is None:
            raise BackendUnavailableError(f"llama-server for {self.entry.name} is not running")
        return await self._upstream.embed(inputs)
