"""The model pool: several models behind one gateway, loaded on demand and evicted by the memory plan.

The pool is the gateway's backend. A request names its model; `route` finds it, and makes it resident when
it is not: the residency planner (residency.py) says load (after evicting idle models), wait (models busy
with requests or loading hold the memory it needs) or refuse (pinned models hold it, or it exceeds the whole
budget). Waiting is bounded by `load_wait_s`; then, or on a refusal, the request gets 503 with Retry-After and
a message naming what would have to go. Loads run as tasks of their own: requests for other models are served
meanwhile. One lock orders the decisions, so two loads never plan for the same free memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from server.gateway.backends.base import (
    Backend,
    BackendError,
    BackendUnavailableError,
    Delta,
    EmbeddingInput,
    EmbeddingResult,
    Embeds,
    GenerationJob,
)
from server.gateway.models.member import EmbeddedKind, Member, ModelKind
from server.gateway.models.memory_plan import Where, budget_bytes, where_models_run
from server.gateway.models.models_file import ModelsFile
from server.gateway.models.pool_metrics import PoolMetrics
from server.gateway.models.residency import Action, Decision, Resident, decide

log = logging.getLogger(__name__)

# How often idle models are checked against their idle TTL.
TTL_CHECK_S = 1.0


class ModelNotFoundError(BackendError):
    status_code = 404
    code = "model_not_found"
    retryable = False


class ModelPool:
    """Every model of a models file, as one Backend that routes by the request's `model`."""

    name = "models"

    def __init__(self, models: ModelsFile, members: list[Member], budget_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.models = models
        self.members = {m.name: m for m in members}
        self.budget_bytes = budget_bytes
        self.metrics = PoolMetrics(self)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False

    @classmethod
    def build(cls, models: ModelsFile, kinds: Mapping[str, ModelKind] | None = None,
              where: Where | None = None) -> ModelPool:
        """Plan every model's memory on this machine (where it runs: detected) and the shared budget."""
        kinds = {"embedded": EmbeddedKind(), **(kinds or {})}
        where = where or where_models_run(models.models)
        members = []
        for entry in models.models:
            kind = kinds.get(entry.backend)
            if kind is None:
                raise ValueError(f"model {entry.name!r}: backend {entry.backend!r} is not available here "
                                 "(`edgeserve serve --models` starts and supervises llama-server models)")
            members.append(Member(entry, kind, kind.planned_bytes(entry, where)))
        return cls(models, members, budget_bytes(models, where))

    # --- Backend protocol -----------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.models.models[0].name

    @property
    def n_ctx(self) -> int:
        return max((m.backend.n_ctx for m in self.members.values() if m.is_resident and m.backend), default=0)

    @property
    def slots(self) -> int:
        """Every model's sequences: admission must not hold back one model for another's busy slots."""
        return sum(m.entry.n_parallel for m in self.members.values())

    def is_ready(self) -> bool:
        return self._started

    async def start(self) -> None:
        """Load the pinned models (they must fit together), then watch idle TTLs."""
        for member in self.members.values():
            if member.entry.policy.pinned:
                await self.ensure_resident(member)
        self._spawn(self._ttl_loop())
        self._started = True

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for member in self.members.values():
            if member.holds_memory:
                try:
                    await member.unload()
                except Exception:
                    log.exception("model %s did not stop cleanly", member.name)

    def count_prompt_tokens(self, job: GenerationJob) -> int | None:
        return None

    def generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        return self._generate(self._member(job.model), job)

    # --- routing --------------------------------------------------------------------------------------------

    def _member(self, name: str) -> Member:
        entry = self.models.entry_for(name)
        if entry is None:
            names = ", ".join(repr(n) for n in self.models.all_names)
            raise ModelNotFoundError(f"the model {name!r} does not exist here; this server serves {names}",
                                     param="model")
        return self.members[entry.name]

    async def route(self, name: str) -> PooledModel:
        """The model `name` names, resident (loaded now if need be). Raises BackendError (404, 503)."""
        member = self._member(name)
        await self.ensure_resident(member)
        return PooledModel(self, member)

    async def _generate(self, member: Member, job: GenerationJob) -> AsyncIterator[Delta]:
        backend = await self._acquire(member)
        try:
            async for delta in backend.generate(job):
                yield delta
        finally:
            self._release(member)

    async def embed_on(self, member: Member, inputs: list[EmbeddingInput]) -> EmbeddingResult:
        backend = await self._acquire(member)
        try:
            if not isinstance(backend, Embeds):
                raise BackendError(f"model {member.name} does not embed", status_code=400,
                                   code="unsupported_feature", retryable=False, param="model")
            return await backend.embed(inputs)
        finally:
            self._release(member)

    async def _acquire(self, member: Member) -> Backend:
        await self.ensure_resident(member)
        # No await between the check and the count: an eviction decided meanwhile sees this request.
        assert member.backend is not None
        member.in_flight += 1
        member.touch()
        return member.backend

    def _release(self, member: Member) -> None:
        member.in_flight -= 1
        member.touch()
        self._notify()

    # --- residency ------------------------------------------------------------------------------------------

    def residents(self) -> tuple[Resident, ...]:
        return tuple(Resident(name=m.name, planned_bytes=m.planned_bytes, last_used=m.last_used,
                              pinned=m.entry.policy.pinned, in_flight=m.in_flight,
                              loading=m.state in ("loading", "unloading"), priority=m.entry.policy.priority)
                     for m in self.members.values() if m.holds_memory)

    async def ensure_resident(self, member: Member) -> None:
        """Return once `member` is resident; load it (evicting what the plan says) if need be, waiting at
        most load_wait_s. Raises BackendUnavailableError (503, Retry-After) or BackendError."""
        deadline = self._clock() + self.models.load_wait_s
        reason = f"model {member.name} is loading"
        failed_before = member.failed_loads
        while True:
            if member.is_resident:
                member.touch()
                return
            if member.failed_loads > failed_before:
                raise BackendUnavailableError(f"model {member.name} failed to load: {member.load_error}",
                                              code="model_load_failed")
            changed = self._changed
            remaining = deadline - self._clock()
            if remaining <= 0:
                self.metrics.refused(member.name, "wait_timeout")
                raise BackendUnavailableError(f"{reason}; still so after {self.models.load_wait_s:g} s",
                                              code="model_not_loaded")
            if not member.holds_memory:
                async with self._lock:
                    decision = self._plan_load(member)
                if decision is not None and decision.action == Action.REFUSE:
                    self.metrics.refused(member.name, "does_not_fit")
                    raise BackendUnavailableError(decision.reason, code="model_does_not_fit", param="model")
                if decision is not None and decision.action == Action.WAIT:
                    reason = decision.reason
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.0, min(remaining, deadline - self._clock())))

    def _plan_load(self, member: Member) -> Decision | None:
        """Under the lock: decide, evict what must go (start its unload), start the load. None: the state
        changed before the lock was ours (ask again)."""
        if member.holds_memory:
            return None
        decision = decide(self.residents(), self.budget_bytes, member.name, member.planned_bytes)
        log.info("model %s: %s (%s)", member.name, decision.action.value, decision.reason)
        if decision.action != Action.LOAD:
            return decision
        for name in decision.evict:
            self._start_unload(self.members[name], "lru")
        self._start_load(member, after=[self.members[n] for n in decision.evict])
        return decision

    def _start_unload(self, member: Member, reason: str) -> None:
        member.state = "unloading"  # holds memory until its backend stopped
        self.metrics.evicted(member.name, reason)
        self._spawn(self._unload(member))

    async def _unload(self, member: Member) -> None:
        try:
            await member.unload()
        except Exception:
            log.exception("model %s did not unload cleanly", member.name)
        log.info("model %s unloaded", member.name)
        self._notify()

    def _start_load(self, member: Member, after: list[Member]) -> None:
        member.state = "loading"
        self._spawn(self._load(member, after))

    async def _load(self, member: Member, after: list[Member]) -> None:
        # The memory it is planned into is free only once the evicted models' backends have stopped.
        while any(m.state == "unloading" for m in after):
            await asyncio.gather(*(m.wait_changed(1.0) for m in after))
        try:
            seconds = await member.load()
        except Exception as exc:
            log.error("model %s failed to load: %s", member.name, exc)
            self.metrics.load_failed(member.name)
        else:
            log.info("model %s resident in %.1f s", member.name, seconds)
            self.metrics.loaded(member.name, seconds)
        self._notify()

    async def _ttl_loop(self) -> None:
        while True:
            await asyncio.sleep(TTL_CHECK_S)
            now = self._clock()
            async with self._lock:
                for member in self.members.values():
                    ttl = member.entry.policy.idle_ttl_s
                    if (ttl is not None and member.is_resident and member.in_flight == 0
                            and not member.entry.policy.pinned and now - member.last_used >= ttl):
                        log.info("model %s idle for %.0f s: unloading", member.name, now - member.last_used)
                        self._start_unload(member, "idle_ttl")

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def bind_registry(self, registry: Any) -> None:
        """Publish the pool's metrics in the app's registry (called by create_app)."""
        self.metrics.bind(registry)


class PooledModel:
    """One model of the pool as a Backend for one request: what the routes check the request against (its
    context, features, prompt length) and where it runs, counted in flight so that it is not evicted."""

    def __init__(self, pool: ModelPool, member: Member) -> None:
        self._pool = pool
        self._member = member
        assert member.backend is not None
        self._backend = member.backend
        self.name = self._backend.name
        self.model_id = member.name
        self.features = getattr(self._backend, "features", None)

    @property
    def n_ctx(self) -> int:
        return self._backend.n_ctx

    @property
    def slots(self) -> int:
        return self._backend.slots

    def is_ready(self) -> bool:
        return self._member.is_resident

    async def start(self) -> None:
        raise RuntimeError("the pool starts its models")

    async def stop(self) -> None:
        raise RuntimeError("the pool stops its models")

    def count_prompt_tokens(self, job: GenerationJob) -> int | None:
        return self._backend.count_prompt_tokens(job) if self._member.is_resident else None

    def generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        return self._pool._generate(self._member, job)

    async def embed(self, inputs: list[EmbeddingInput]) -> EmbeddingResult:
        return await self._pool.embed_on(self._member, inputs)
