"""The fallback chain: one Backend over an ordered list of backends, so no request is lost to one of them.

Per request: the first backend that is up, whose breaker lets work through and whose context holds the prompt
takes it (a full one hands it on to the next; all full: 429). If it fails before any text reached the client
(connection refused or reset, 5xx, out of memory, process gone, nothing for `stall_timeout_s`) the request
goes to the next backend unseen. If it fails after, the next backend continues the same answer (resume.py):
the client sees one stream with one finish_reason and usage summed over the backends. Every backend is tried
at most once per request, so a request ends however many backends are down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from server.gateway.admission import Admission, Lease, QueueFullError, QueueTimeoutError
from server.gateway.backends.base import (
    Backend,
    BackendError,
    BackendStats,
    BackendUnavailableError,
    ContextLengthExceededError,
    Delta,
    EmbeddingInput,
    EmbeddingResult,
    Embeds,
    GenerationJob,
    ReportsStats,
    supported_features,
)
from server.gateway.backends.features import EMBEDDINGS
from server.gateway.breaker import CircuitBreaker
from server.gateway.chain_config import ChainConfig, MemberConfig, build_member_backend
from server.gateway.chain_member import Member, StallError, describe, failure_reason
from server.gateway.reliability_metrics import ChainMetrics, MemberSnapshot, watch_supervisors
from server.gateway.resume import (
    StreamProgress,
    clamp_to_context,
    continuation_job,
    fetch_chat_template,
    for_remote,
)

log = logging.getLogger(__name__)

# The end of a backend's stream of several choices (each choice has finished on its own before).
_END = Delta(text="", finish_reason="stop")


class FallbackBackend:
    """Implements the Backend protocol over `members`, tried in order."""

    name = "fallback"
    # The chain queues per backend: the gateway's own admission gate must not queue in front of it.
    has_own_queue = True

    def __init__(self, members: Sequence[tuple[MemberConfig, Backend]], *, model_name: str | None = None,
                 metrics: ChainMetrics | None = None) -> None:
        if not members:
            raise ValueError("a fallback chain needs at least one backend")
        self.metrics = metrics or ChainMetrics()
        self._model_name = model_name
        total = sum(cfg.capacity for cfg, _ in members)
        self.members: list[Member] = [
            Member(config=cfg, backend=backend,
                   breaker=CircuitBreaker(cfg.name, cfg.breaker, on_change=self._breaker_changed),
                   gate=Admission(limit=cfg.n_parallel, max_queue=total))
            for cfg, backend in members
        ]
        self.metrics.watch(self.snapshots)
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: ChainConfig) -> FallbackBackend:
        return cls([(m, build_member_backend(m)) for m in config.backends], model_name=config.model_name)

    def bind_registry(self, registry: CollectorRegistry) -> None:
        """Publish the chain's metrics in the app's registry (called by create_app)."""
        self.metrics = ChainMetrics(registry)
        self.metrics.watch(self.snapshots)

    # --- Backend protocol -----------------------------------------------------------------------------------

    @property
    def model_id(self) -> str | None:
        if self._model_name:
            return self._model_name
        for m in self.members:
            model = getattr(m.backend, "model_id", None)
            if m.is_started and model:
                return str(model)
        return None

    @property
    def n_ctx(self) -> int:
        """The largest context of any backend: a prompt that fits none of them is refused up front."""
        return max((m.n_ctx for m in self.members), default=0)

    @property
    def slots(self) -> int:
        """Requests the chain can hold (running and queued, all backends): the gateway's in-flight cap."""
        return sum(m.config.capacity for m in self.members)

    def is_ready(self) -> bool:
        return any(m.is_available() for m in self.members)

    @property
    def features(self) -> frozenset[str]:
        """What at least one member supports: a request is sent only to members that support all it asks."""
        out: frozenset[str] = frozenset()
        for m in self.members:
            out |= supported_features(m.backend)
        return out

    async def embed(self, inputs: list[EmbeddingInput]) -> EmbeddingResult:
        """On the first available member that embeds."""
        for m in self.members:
            backend = m.backend
            if m.is_available() and EMBEDDINGS in supported_features(backend) and isinstance(backend, Embeds):
                return await backend.embed(inputs)
        raise BackendUnavailableError(
            "no available backend of the chain embeds: " + describe(self.members, set()))

    async def start(self) -> None:
        """Start every backend; one that cannot start (e.g. out of memory) stays out with its breaker open."""
        results = await asyncio.gather(*(self._start_member(m) for m in self.members), return_exceptions=True)
        for m, result in zip(self.members, results, strict=True):
            if isinstance(result, BaseException):
                m.start_error = str(result) or type(result).__name__
                m.breaker.trip()
                self.metrics.failures.labels(backend=m.name, reason=failure_reason(result)).inc()
                log.error("chain backend %s failed to start: %s", m.name, m.start_error)
            else:
                m.is_started = True
                log.info("chain backend %s started (%s, %d slots, context %d)", m.name, m.config.kind,
                         m.config.n_parallel, m.n_ctx)
        if not any(m.is_started for m in self.members):
            raise RuntimeError("no backend of the chain could start: " + "; ".join(
                f"{m.name}: {m.start_error}" for m in self.members))
        if any(m.config.supervisor_status for m in self.members):
            paths = {m.name: m.config.supervisor_status for m in self.members if m.config.supervisor_status}
            self._watcher = asyncio.create_task(watch_supervisors(paths, self.record_ladder_step))

    @staticmethod
    async def _start_member(m: Member) -> None:
        if not m.backend.is_ready():  # a backend handed over already running is kept as it is
            await m.backend.start()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
            self._watcher = None
        for m in self.members:
            if m.is_started:
                try:
                    await m.backend.stop()
                except Exception:
                    log.exception("chain backend %s did not stop cleanly", m.name)
                m.is_started = False

    def count_prompt_tokens(self, job: GenerationJob) -> int | None:
        for m in self.members:
            if m.is_started:
                count = m.backend.count_prompt_tokens(job)
                if count is not None:
                    return count
        return None

    def stats(self) -> BackendStats:
        """The engine figures of the first backend that has any (the embedded engine)."""
        for m in self.members:
            if m.is_started and isinstance(m.backend, ReportsStats):
                return m.backend.stats()
        return BackendStats()

    def generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        return self._generate(job, StreamProgress())

    def stream(self, job: GenerationJob) -> tuple[AsyncIterator[Delta], StreamProgress]:
        """`generate`, plus the live record of which backend produced which part (for logs and tests)."""
        progress = StreamProgress()
        return self._generate(job, progress), progress

    # --- routing --------------------------------------------------------------------------------------------

    def snapshots(self) -> list[MemberSnapshot]:
        out = []
        for m in self.members:
            snap = m.gate.snapshot()
            out.append(MemberSnapshot(name=m.name, breaker_state=m.breaker.state,
                                      is_available=m.is_available(), in_flight=snap.in_flight,
                                      waiting=snap.waiting, slots=snap.limit))
        return out

    def record_ladder_step(self, backend: str, rung: str, detail: str = "") -> None:
        """The supervisor restarted `backend` one rung down the OOM ladder."""
        self.metrics.ladder_steps.labels(backend=backend, rung=rung).inc()
        log.warning("backend %s restarted one OOM-ladder step down: %s %s", backend, rung, detail)

    def _breaker_changed(self, name: str, old: str, new: str) -> None:
        self.metrics.breaker_transitions.labels(backend=name, to_state=new).inc()

    def _estimate_tokens(self, member: Member, job: GenerationJob) -> int | None:
        count = member.backend.count_prompt_tokens(job) if member.is_started else None
        # A remote cannot count before sending; the chain serves one model, so another member's count will do.
        return count if count is not None else self.count_prompt_tokens(job)

    def _candidates(self, job: GenerationJob,
                    exclude: set[str]) -> tuple[list[tuple[Member, GenerationJob]], bool]:
        """Available members that can hold `job` (max_tokens clamped to fit), best first; and whether any
        otherwise usable member was left out only because the prompt is too long for it."""
        full: list[tuple[Member, GenerationJob]] = []
        clamped: list[tuple[Member, GenerationJob]] = []
        too_long = False
        needs = job.features
        for m in self.members:
            if m.name in exclude or not m.is_available() or not needs <= supported_features(m.backend):
                continue
            n_ctx = m.n_ctx
            count = self._estimate_tokens(m, job) if n_ctx else None
            if count is None:
                full.append((m, job))
                continue
            fitted = clamp_to_context(job, count, n_ctx)
            if fitted is None:
                too_long = True
            elif fitted is job:
                full.append((m, job))
            else:
                clamped.append((m, fitted))
        return full + clamped, too_long

    async def _place(self, job: GenerationJob, exclude: set[str], *, is_failover: bool = False,
                     is_resume: bool = False) -> tuple[Member, GenerationJob, Lease]:
        """Choose a backend for `job` and take one of its slots (waiting in its queue if need be)."""
        candidates, too_long = self._candidates(job, exclude)
        missing = [m.name for m in self.members if not job.features <= supported_features(m.backend)]
        if not candidates and len(missing) == len(self.members):
            raise BackendError(f"no backend of the chain supports {', '.join(sorted(job.features))}",
                               status_code=400, code="unsupported_feature", retryable=False)
        if not candidates:
            if too_long and not any(m.is_available() and m.name not in exclude and m.n_ctx == 0
                                    for m in self.members):
                self.metrics.refused.labels(reason="context_length").inc()
                longest = max((m.n_ctx for m in self.members if m.name not in exclude), default=self.n_ctx)
                raise ContextLengthExceededError(
                    f"the prompt does not fit the context of any available backend (largest: {longest})",
                    param="messages" if job.kind == "chat" else "prompt")
            self.metrics.refused.labels(reason="no_backend").inc()
            raise BackendUnavailableError(
                "no backend of the chain is available: " + describe(self.members, exclude))
        # A free slot now beats a queue; among queues, the order of the chain.
        ordered = [c for c in candidates if c[0].has_free_slot()] + [
            c for c in candidates if not c[0].has_free_slot() and c[0].has_room(is_failover=is_failover)]
        for member, fitted in ordered:
            if not member.breaker.allow():
                continue  # half-open and another request is the probe
            try:
                # A resumed stream goes to the head of the line: its client is mid-answer.
                lease = await member.gate.acquire(member.config.queue_timeout_s, first=is_resume)
            except QueueFullError:
                member.breaker.release_probe()
                continue
            except QueueTimeoutError:
                member.breaker.release_probe()
                self.metrics.refused.labels(reason="queue_timeout").inc()
                raise BackendError(f"backend {member.name} had no free slot within "
                                   f"{member.config.queue_timeout_s:g} s", status_code=408,
                                   code="queue_timeout", retryable=False) from None
            except BaseException:
                member.breaker.release_probe()
                raise
            return member, fitted, lease
        self.metrics.refused.labels(reason="queue_full").inc()
        raise BackendError("every backend of the chain is busy and its queue is full; retry later",
                           status_code=429, code="queue_full", retryable=False)

    def member_states(self) -> dict[str, str]:
        """Each member's state for /ready: up, down, or out for good with the reason it did not start."""
        return {m.name: m.state() for m in self.members}

    async def _prepare(self, member: Member, job: GenerationJob) -> GenerationJob:
        """A resumed chat for a remote goes as a raw completion when its chat template is known."""
        if member.config.kind != "openai" or job.kind != "chat" or not job.continuation:
            return job
        if not member._template_tried:
            member._template_tried = True
            url, timeout_s = member.config.url or "", member.config.connect_timeout_s
            member.template = await fetch_chat_template(url, timeout_s)
            if member.template is None:
                log.info("backend %s reports no chat template: resumed chats go to it as chat", member.name)
        return for_remote(job, member.template)

    # --- one request ----------------------------------------------------------------------------------------

    async def _generate(self, job: GenerationJob, progress: StreamProgress) -> AsyncIterator[Delta]:
        tried: set[str] = set()
        previous: str | None = None
        context_error: ContextLengthExceededError | None = None
        while True:
            attempt = continuation_job(job, progress)
            if attempt is None:
                yield progress.length_finish()
                return
            try:
                member, attempt, lease = await self._place(attempt, tried, is_failover=bool(tried),
                                                           is_resume=progress.has_output)
            except BackendUnavailableError:
                if context_error is not None:
                    raise context_error from None  # the others are down: the prompt is what failed here
                raise
            tried.add(member.name)
            if previous is not None:
                phase = "mid_stream" if progress.has_output else "before_output"
                self.metrics.fallbacks.labels(from_backend=previous, to_backend=member.name,
                                              phase=phase).inc()
                log.warning("request moves from %s to %s (%s, %d tokens sent so far)", previous, member.name,
                            phase, progress.completion_tokens)
            self.metrics.attempts.labels(backend=member.name).inc()
            progress.begin(member.name)
            error: BackendError | None = None
            iterator: AsyncIterator[Delta] | None = None
            try:
                iterator = member.backend.generate(await self._prepare(member, attempt))
                while True:
                    try:
                        delta = await asyncio.wait_for(anext(iterator), member.config.stall_timeout_s)
                    except StopAsyncIteration:
                        delta = _END if job.n > 1 else Delta(text="", finish_reason="stop")
                    except asyncio.TimeoutError:
                        raise StallError(f"backend {member.name} sent nothing for "
                                          f"{member.config.stall_timeout_s:g} s") from None
                    # Several choices finish one by one: the request is done when the backend's stream is.
                    finished = delta.finish_reason is not None and (job.n == 1 or delta is _END)
                    if finished:
                        member.breaker.record_success()
                    if delta is not _END:
                        counted = progress.absorb(delta)
                        # Only a resumable job is re-counted across backends; the others go out as they came.
                        yield counted if job.can_resume else delta
                    if finished:
                        return
            except BackendError as exc:
                error = exc
            except Exception as exc:  # anything else a backend raises is its failure, not the client's
                log.exception("backend %s raised", member.name)
                error = BackendError(f"backend {member.name} failed: {exc}", code="backend_error")
            finally:
                lease.release()
                if iterator is not None:
                    with contextlib.suppress(Exception):
                        aclose = getattr(iterator, "aclose", None)
                        if aclose is not None:
                            await aclose()
                if error is None and member.breaker.state == "half_open":
                    member.breaker.release_probe()  # the client left during the probe: no verdict
            assert error is not None
            if progress.has_output and not job.can_resume:
                # Choices, tool calls and grammars cannot be carried on by another backend mid-answer.
                self._account(member, error, progress)
                raise BackendError(f"backend {member.name} failed mid-answer and this request cannot move "
                                   f"to another backend: {error.message}", status_code=error.status_code,
                                   code=error.code, retryable=False)
            if isinstance(error, ContextLengthExceededError):
                context_error = error
            self._account(member, error, progress)
            progress.abandon()
            previous = member.name

    def _account(self, member: Member, error: BackendError, progress: StreamProgress) -> None:
        """Judge one failure: count it against the backend or give it back to the client."""
        if isinstance(error, ContextLengthExceededError):
            # Not the backend's fault: another backend with a longer context may take it.
            member.breaker.release_probe()
            log.info("backend %s: context too small for this request, trying the next", member.name)
            return
        if not error.retryable:
            member.breaker.release_probe()
            raise error
        reason = failure_reason(error)
        member.breaker.record_failure()
        self.metrics.failures.labels(backend=member.name, reason=reason).inc()
        log.warning("backend %s failed (%s%s): %s", member.name, reason,
                    ", mid-stream" if progress.has_output else "", error.message[:300])
