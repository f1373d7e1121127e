"""Mid-stream resume: continue a stream that broke after tokens reached the client on another backend.

The client has already received some text. The next backend is asked to generate as if that text were its own
output (GenerationJob.continuation: for chat the assistant turn is pre-filled with it) with the tokens left of
max_tokens. Its deltas are re-counted so the client sees one stream: cumulative completion tokens summed over
the backends, the prompt tokens of the original prompt, and one finish_reason at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import httpx

from server.engine.chat_template import ChatTemplate, ChatTemplateError
from server.gateway.backends.base import Delta, GenerationJob
from server.gateway.jobs import MAX_TOKENS_EXPLICIT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """The part of one response that one backend produced."""

    backend: str
    completion_tokens: int
    chars: int
    finished: bool


@dataclass
class StreamProgress:
    """What the client has been sent so far, across backends (mutable: one per request)."""

    text: str = ""
    prompt_tokens: int = 0
    segments: list[Segment] = field(default_factory=list)
    _backend: str = ""
    _base_tokens: int = 0
    _segment_tokens: int = 0
    _segment_chars: int = 0

    @property
    def has_output(self) -> bool:
        """Did anything reach the client? (Then a failure must resume, not retry from scratch.)"""
        return bool(self.text) or self.completion_tokens > 0

    @property
    def completion_tokens(self) -> int:
        return self._base_tokens + self._segment_tokens

    def begin(self, backend: str) -> None:
        """A new backend takes over from here."""
        self._backend = backend
        self._segment_tokens = 0
        self._segment_chars = 0

    def absorb(self, delta: Delta) -> Delta:
        """Account for one delta of the current backend; return it re-counted for the whole response."""
        self.text += delta.text
        self._segment_chars += len(delta.text)
        self._segment_tokens = max(self._segment_tokens, delta.completion_tokens)
        if not self.segments and delta.prompt_tokens:
            # Only the first backend saw the client's prompt alone; later ones also count the continuation.
            self.prompt_tokens = delta.prompt_tokens
        elif not self.prompt_tokens and delta.prompt_tokens:
            self.prompt_tokens = max(0, delta.prompt_tokens - self._base_tokens)
        if delta.finish_reason is not None:
            self._close(finished=True)
        return dataclasses.replace(delta, prompt_tokens=self.prompt_tokens,
                                   completion_tokens=self.completion_tokens)

    def abandon(self) -> None:
        """The current backend failed: keep what it sent, start counting the next one from there."""
        self._close(finished=False)

    def _close(self, *, finished: bool) -> None:
        self.segments.append(Segment(self._backend, self._segment_tokens, self._segment_chars, finished))
        self._base_tokens += self._segment_tokens
        self._segment_tokens = 0
        self._segment_chars = 0

    def length_finish(self) -> Delta:
        """The closing delta when max_tokens ran out exactly as the backend broke."""
        return Delta(text="", finish_reason="length", prompt_tokens=self.prompt_tokens,
                     completion_tokens=self.completion_tokens)


def remaining_tokens(job: GenerationJob, progress: StreamProgress) -> int:
    return job.params.max_tokens - progress.completion_tokens


def continuation_job(job: GenerationJob, progress: StreamProgress) -> GenerationJob | None:
    """The job that carries on after `progress`, or None when max_tokens is already used up."""
    if not progress.has_output:
        return job
    left = remaining_tokens(job, progress)
    if left < 1:
        return None
    params = dataclasses.replace(job.params, max_tokens=left)
    # The remaining budget is exact now: a remote server must be told it, even if the client gave none.
    extra = {**job.extra, MAX_TOKENS_EXPLICIT: True}
    return dataclasses.replace(job, params=params, continuation=job.continuation + progress.text, extra=extra)


def clamp_to_context(job: GenerationJob, prompt_tokens: int, n_ctx: int) -> GenerationJob | None:
    """`job` with max_tokens cut to what fits after `prompt_tokens` in `n_ctx`; None if nothing fits."""
    room = n_ctx - prompt_tokens
    if room < 1:
        return None
    if job.params.max_tokens <= room:
        return job
    return dataclasses.replace(job, params=dataclasses.replace(job.params, max_tokens=room))


def as_completion(job: GenerationJob, template: ChatTemplate) -> GenerationJob:
    """A chat job turned into a text completion of its rendered prompt (the continuation stays separate).

    A remote server asked to continue a chat through /v1/chat/completions may open a new assistant turn
    instead of continuing the partial one; the raw prompt through /v1/completions cannot.
    """
    if job.kind != "chat":
        return job
    prompt = template.render(list(job.messages), add_generation_prompt=True)
    return dataclasses.replace(job, kind="completion", prompt=prompt, messages=())


def for_remote(job: GenerationJob, template: ChatTemplate | None) -> GenerationJob:
    """What to send a remote to continue `job`: the raw completion when the template renders, else the chat
    (with the partial assistant message, which most servers continue)."""
    if template is None or job.kind != "chat":
        return job
    try:
        return as_completion(job, template)
    except ChatTemplateError as exc:
        log.info("cannot render the chat for a raw continuation (%s): sending it as chat", exc)
        return job


async def fetch_chat_template(base_url: str, timeout_s: float) -> ChatTemplate | None:
    """The chat template a llama-server reports at /props, or None (no /props, or no template there)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as client:
            props = (await client.get(f"{root}/props")).json()
    except (httpx.HTTPError, ValueError):
        return None
    source = props.get("chat_template") if isinstance(props, dict) else None
    if not isinstance(source, str) or not source:
        return None
    # The server adds BOS itself when it tokenizes a completion prompt: render none.
    return ChatTemplate(source, bos_token="", eos_token=str(props.get("eos_token") or ""))
