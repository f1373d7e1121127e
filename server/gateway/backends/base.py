"""The contract between the gateway and whatever generates tokens (embedded engine, remote OpenAI server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from server.engine.types import SamplingParams

JobKind = Literal["chat", "completion"]


@dataclass(frozen=True)
class GenerationJob:
    """One request as the gateway hands it to a backend.

    `chat` jobs carry `messages` (OpenAI dicts); `completion` jobs carry `prompt`. `continuation` is text the
    client has already received from another backend: the backend must generate as if that text were already
    its own output (for chat: the assistant turn is pre-filled with it) and not send it again.
    """

    kind: JobKind
    params: SamplingParams
    model: str = ""
    messages: tuple[dict[str, Any], ...] = ()
    prompt: str = ""
    continuation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability (`token` is its text; `token_bytes` its raw UTF-8)."""

    token: str
    logprob: float
    token_bytes: tuple[int, ...] = ()
    top: tuple[tuple[str, float], ...] = ()  # the most likely alternatives, when asked for


@dataclass(frozen=True)
class Delta:
    """A piece of generated text. The last delta has `finish_reason`; counts are cumulative for the job.

    `logprobs` holds the tokens behind `text` when the job asked for log-probabilities (else empty).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class BackendStats:
    """A backend's own counters, read when /metrics is scraped. Fields a backend cannot tell stay None/empty.

    `batch_size_steps` maps sequences-per-step to how many engine steps had that many (cumulative);
    `step_tokens_steps` does the same for tokens per step (decode + prefill).
    """

    running: int | None = None
    waiting: int | None = None
    kv_used_cells: int | None = None
    kv_total_cells: int | None = None
    preemptions_total: int | None = None
    steps_total: int | None = None
    batch_size_steps: dict[int, int] = field(default_factory=dict)
    step_tokens_steps: dict[int, int] = field(default_factory=dict)
    sampled_in_graph_total: int | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)
    # prompt tokens whose KV came from a cached prefix instead of being computed (a router's cache_aware
    # policy shows here: prefixes that reach the replica holding them)
    prefix_reused_tokens_total: int | None = None

    @property
    def kv_usage_ratio(self) -> float | None:
        if self.kv_used_cells is None or not self.kv_total_cells:
            return None
        return self.kv_used_cells / self.kv_total_cells


@runtime_checkable
class ReportsStats(Protocol):
    """Optional: a backend that can describe its engine for /metrics."""

    def stats(self) -> BackendStats: ...


class BackendError(Exception):
    """A backend failed. `retryable` failures before any token may go to the next backend."""

    status_code: int = 502
    code: str = "backend_error"
    retryable: bool = True

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 retryable: bool | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class ContextLengthExceededError(BackendError):
    """prompt + max_tokens does not fit this backend's context window (not retryable on the same backend)."""

    status_code = 400
    code = "context_length_exceeded"
    retryable = False


class BackendUnavailableError(BackendError):
    """The backend cannot take work now (not ready, dead, out of memory, connection refused)."""

    status_code = 503
    code = "backend_unavailable"
    retryable = True


@runtime_checkable
class Backend(Protocol):
    """A source of completions: embedded engine, remote OpenAI-compatible server, fallback chain."""

    name: str

    @property
    def n_ctx(self) -> int:
        """Context window of one sequence, in tokens."""
        ...

    @property
    def slots(self) -> int:
        """Sequences it can run at once (admission lets this many in flight)."""
        ...

    def is_ready(self) -> bool:
        """Loaded and able to take work now."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def count_prompt_tokens(self, job: GenerationJob) -> int | None:
        """Tokens of the rendered prompt, or None when this backend cannot tell before sending."""
        ...

    def generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        """Stream deltas. Closing the iterator cancels the job and frees its resources.

        Raises BackendError (or subclasses) on failure; ContextLengthExceededError before any delta.
        """
        ...
