"""Running one job: admission, the first delta, deadlines, client disconnects, and the non-streamed answer.

The first delta is awaited before any response is started, so everything that fails early (queue full, context
too long, backend down) still gets its own HTTP status, for streamed requests too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client.metrics import Histogram
from starlette.requests import Request

from server.gateway.admission import Lease, QueueFullError, QueueTimeoutError
from server.gateway.backends.base import Backend, BackendError, Delta, GenerationJob, TokenLogprob
from server.gateway.choices import Choices
from server.gateway.errors import APIError, from_backend_error
from server.gateway.feed import DeltaFeed, FeedEndingError, FeedTimeoutError
from server.gateway.schemas import Usage
from server.gateway.state import GatewayState

log = logging.getLogger(__name__)

T = TypeVar("T")

CLIENT_CLOSED_STATUS = 499


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready."""


class RequestTimeoutError(Exception):
    """The request ran past settings.request_timeout_s."""


class ServerEndingError(Exception):
    """The shutdown grace period is over: the request ends now, with an answer, not a cut connection."""


def ending_error(state: GatewayState) -> APIError:
    return APIError(503, "the server is shutting down and this request could not finish in time; retry it",
                    code="server_shutting_down", headers=state.retry_after())


def timeout_error(timeout_s: float) -> APIError:
    return APIError(504, f"request did not finish within {timeout_s:g} s", type="timeout_error",
                    code="timeout")


async def _wait_disconnect(request: Request) -> None:
    # After the body has been read, the next ASGI message on this connection is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def guarded(request: Request, awaitable: Awaitable[T], deadline: float,
                  ending: asyncio.Event | None = None) -> T:
    """Await `awaitable` unless the client disconnects, the deadline passes or the server's grace period
    ends (`ending`) first; then cancel it."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    stopper = asyncio.ensure_future(ending.wait()) if ending is not None else None
    waiting = {work, watcher} | ({stopper} if stopper is not None else set())
    try:
        done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        for task in waiting:
            task.cancel()
        raise
    watcher.cancel()
    if stopper is not None:
        stopper.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    if watcher in done:
        raise ClientDisconnectedError
    if stopper is not None and stopper in done:
        raise ServerEndingError
    raise RequestTimeoutError


async def _first(iterator: AsyncIterator[Delta]) -> Delta:
    return await anext(iterator)


@dataclass
class RunningJob:
    """An admitted job whose first delta has arrived; the rest come through `feed`. `close()` frees the
    backend sequence and the slot."""

    route: str
    state: GatewayState
    job: GenerationJob
    lease: Lease
    feed: DeltaFeed
    first: Delta
    started: float
    deadline: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    is_completed: bool = False
    is_answered: bool = False  # ended with an error the client was told about (not a disconnect)
    choices: Choices = field(default_factory=lambda: Choices(1))
    _closed: bool = False
    _itl: Histogram | None = None

    def record(self, delta: Delta) -> None:
        """Account for one delta: its choice, token counts, TTFT / inter-token latency. The job is finished
        (`finish_reason` set) when every choice is."""
        now = time.monotonic()
        if self.choices.record(delta):
            if self.first_token_at is None:
                self.first_token_at = now
                self.state.metrics.ttft.labels(route=self.route).observe(now - self.started)
            elif self.last_token_at is not None:
                if self._itl is None:
                    self._itl = self.state.metrics.itl.labels(route=self.route)
                self._itl.observe(now - self.last_token_at)
            self.last_token_at = now
        if delta.finish_reason is not None and delta.prompt_tokens:
            # The last delta carries the backend's final counts: they win over running estimates.
            self.prompt_tokens = delta.prompt_tokens
        else:
            self.prompt_tokens = max(self.prompt_tokens, delta.prompt_tokens)
        self.completion_tokens = self.choices.completion_tokens
        self.finish_reason = self.choices.finish_reason
        self.logprobs.extend(delta.logprobs)

    @property
    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)

    async def next_delta(self) -> Delta | None:
        """The next delta, None when the backend is done. Raises RequestTimeoutError past the deadline and
        ServerEndingError when the shutdown grace period ends first."""
        try:
            return await self.feed.next()
        except FeedTimeoutError:
            raise RequestTimeoutError from None
        except FeedEndingError:
            raise ServerEndingError from None

    def ready_deltas(self) -> list[Delta]:
        """Deltas that have arrived already (sent together with the one just taken)."""
        return self.feed.ready()

    async def close(self, *, completed: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self.is_completed = completed
        try:
            await self.feed.close()
        finally:
            self.lease.release()
            metrics = self.state.metrics
            if completed:
                metrics.e2e.labels(route=self.route).observe(time.monotonic() - self.started)
            metrics.observe_tokens(self.prompt_tokens, self.completion_tokens)


async def start_job(request: Request, state: GatewayState, job: GenerationJob, route: str,
                    backend: Backend | None = None) -> RunningJob:
    """Admit `job`, start it on `backend` (default: the app's) and wait for its first delta."""
    settings = state.settings
    metrics = state.metrics
    state.require_ready()
    started = time.monotonic()
    deadline = started + settings.request_timeout_s
    try:
        lease = await guarded(request, state.admission.acquire(settings.queue_timeout_s), deadline,
                              state.ending)
    except QueueFullError as exc:
        metrics.rejected.labels(reason="queue_full").inc()
        raise APIError(429, f"server is at capacity: {exc}; retry later", code="queue_full",
                       headers=state.retry_after()) from None
    except QueueTimeoutError as exc:
        metrics.rejected.labels(reason="queue_timeout").inc()
        # 408, as OpenAI's SDK retries it (with Retry-After): the request waited its turn and got none.
        raise APIError(408, f"server is busy: {exc}; retry later", code="queue_timeout",
                       headers=state.retry_after()) from None
    except RequestTimeoutError:
        raise timeout_error(settings.request_timeout_s) from None
    except ServerEndingError:
        raise ending_error(state) from None
    metrics.queue_wait.observe(time.monotonic() - started)
    iterator = (backend or state.backend).generate(job)
    try:
        first = await guarded(request, _first(iterator), deadline, state.ending)
    except BaseException as exc:
        lease.release()
        with contextlib.suppress(Exception):
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if isinstance(exc, StopAsyncIteration):
            raise APIError(502, "backend ended the stream without an answer", code="empty_response") from None
        if isinstance(exc, BackendError):
            raise from_backend_error(exc, settings.retry_after_s) from None
        if isinstance(exc, RequestTimeoutError):
            raise timeout_error(settings.request_timeout_s) from None
        if isinstance(exc, ServerEndingError):
            raise ending_error(state) from None
        raise
    feed = DeltaFeed(iterator, deadline, state.ending)
    running = RunningJob(route=route, state=state, job=job, lease=lease, feed=feed, first=first,
                         started=started, deadline=deadline, choices=Choices(job.n))
    running.record(first)
    return running


async def _drain(running: RunningJob) -> str:
    parts = [running.first.text]
    while running.finish_reason is None:
        delta = await running.next_delta()
        if delta is None:
            break
        running.record(delta)
        parts.append(delta.text)
    return "".join(parts)


async def collect(request: Request, running: RunningJob) -> str:
    """The whole answer of a non-streamed request. Cancels the job if the client leaves."""
    completed = False
    try:
        text = await guarded(request, _drain(running), running.deadline, running.state.ending)
        completed = True
        return text
    except BackendError as exc:
        raise from_backend_error(exc, running.state.settings.retry_after_s) from None
    except RequestTimeoutError:
        raise timeout_error(running.state.settings.request_timeout_s) from None
    except ServerEndingError:
        raise ending_error(running.state) from None
    except ClientDisconnectedError:
        running.state.metrics.cancelled.inc()
        raise
    finally:
        await running.close(completed=completed)
