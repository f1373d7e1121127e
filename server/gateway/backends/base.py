"""The contract between the gateway and whatever generates tokens (embedded engine, remote OpenAI server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from server.engine.types import SamplingParams
from server.gateway.backends.features import LOGIT_BIAS, TOKEN_PROMPT, TOOLS, N, OutputConstraint, ToolSpec

JobKind = Literal["chat", "completion"]


@dataclass(frozen=True)
class GenerationJob:
    """One request as the gateway hands it to a backend.

    `chat` jobs carry `messages` (OpenAI dicts); `completion` jobs carry `prompt` (or `prompt_tokens`).
    `continuation` is text the client has already received from another backend: the backend must generate
    as if that text were already its own output (for chat: the assistant turn is pre-filled with it) and not
    send it again. `n` choices share the prompt (their seeds: seed, seed + 1, ...); `constraint` and `tools`
    are the request's structured output and tool calling.
    """

    kind: JobKind
    params: SamplingParams
    model: str = ""
    messages: tuple[dict[str, Any], ...] = ()
    prompt: str = ""
    continuation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    n: int = 1
    constraint: OutputConstraint | None = None
    tools: ToolSpec | None = None
    prompt_tokens: tuple[int, ...] | None = None

    @property
    def features(self) -> frozenset[str]:
        """What this job needs of a backend beyond plain sampling (backends/features.py)."""
        needs = set()
        if self.constraint is not None:
            needs.add(self.constraint.feature)
        if self.tools is not None and self.tools.mode != "none":
            needs.add(TOOLS)
        if self.n > 1:
            needs.add(N)
        if self.params.logit_bias:
            needs.add(LOGIT_BIAS)
        if self.prompt_tokens is not None:
            needs.add(TOKEN_PROMPT)
        return frozenset(needs)

    @property
    def can_pass_through(self) -> bool:
        """Whether an upstream's chunks can reach the client unchanged: one choice, no tool calls to parse,
        no logprobs to render, nothing resumed from another backend."""
        return (self.n == 1 and not self.continuation and self.params.logprobs is None
                and (self.tools is None or self.tools.mode == "none"))

    @property
    def can_resume(self) -> bool:
        """Whether another backend can carry on from text already sent: not for several choices, tool calls,
        constrained output (a grammar cannot restart in the middle) or a prompt of token ids."""
        return (self.n == 1 and self.constraint is None and self.prompt_tokens is None
                and (self.tools is None or self.tools.mode == "none"))


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability (`token` is its text; `token_bytes` its raw UTF-8)."""

    token: str
    logprob: float
    token_bytes: tuple[int, ...] = ()
    top: tuple[tuple[str, float], ...] = ()  # the most likely alternatives, when asked for


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call: its first piece has `id` and `name`, the rest `arguments` text to append."""

    index: int  # the call's place among its choice's calls
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class Delta:
    """A piece of generated text of choice `index`. The last delta of a choice has `finish_reason`; counts
    are cumulative for the choice.

    `logprobs` holds the tokens behind `text` when the job asked for log-probabilities (else empty).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()
    # An upstream's own chunk (its JSON text) that says exactly this, under the job's model name: a stream
    # that needs nothing rewritten sends it on as it came instead of building it again.
    raw: str | None = None


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
    # speculative decoding: draft tokens verified and accepted; sequence-steps and the tokens they produced
    spec_drafted_total: int | None = None
    spec_accepted_total: int | None = None
    seq_steps_total: int | None = None
    generated_tokens_total: int | None = None

    @property
    def kv_usage_ratio(self) -> float | None:
        if self.kv_used_cells is None or not self.kv_total_cells:
            return None
        return self.kv_used_cells / self.kv_total_cells


@dataclass(frozen=True)
class EmbeddingResult:
    """One vector per input, in order, and the tokens the inputs took."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


EmbeddingInput = str | tuple[int, ...]


@runtime_checkable
class Embeds(Protocol):
    """Optional: a backend that can embed (/v1/embeddings)."""

    async def embed(self, inputs: list[EmbeddingInput]) -> EmbeddingResult: ...


def supported_features(backend: object) -> frozenset[str]:
    """The features a backend declares (its `features` attribute); none for one that declares nothing."""
    declared = getattr(backend, "features", None)
    return frozenset(declared) if declared is not None else frozenset()


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
