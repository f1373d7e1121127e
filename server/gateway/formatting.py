"""Deltas -> OpenAI payloads, one formatter per route (chat completions and text completions).

Every choice of a request comes in the same stream with its own `index`, as OpenAI interleaves them; tool
calls go out as `tool_calls` deltas (the call's id, type and name first, then its arguments), which the
openai SDK assembles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.gateway.backends.base import Delta, TokenLogprob, ToolCallDelta
from server.gateway.choices import Choice
from server.gateway.schemas import (
    AssistantMessage,
    CalledFunction,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprobEntry,
    ToolCallOut,
    Usage,
)

Payload = dict[str, Any]
FINISH_REASONS = ("stop", "length", "tool_calls")


def _finish(reason: str | None) -> str | None:
    # The engine's "cancelled" never reaches a client that is still listening; anything odd reads as "stop".
    if reason is None or reason in FINISH_REASONS:
        return reason
    return "stop"


def system_fingerprint(model: str) -> str:
    """OpenAI's system_fingerprint: a string that changes when what serves the model changes."""
    return "fp_" + hashlib.sha256(f"edgeserve/{model}".encode("utf-8", "backslashreplace")).hexdigest()[:10]


class Formatter(Protocol):
    """Builds one route's response body, stream chunks and usage chunk."""

    def adopt(self, upstream_chunk: str) -> None:
        """Take the stream's id, created and fingerprint from an upstream chunk that will be passed through,
        so that the chunks the gateway builds and those it passes on read as one stream."""

    def opening_chunks(self) -> list[Payload]: ...

    def chunk(self, delta: Delta) -> Payload: ...

    def usage_chunk(self, usage: Usage) -> Payload: ...

    def response(self, choices: Sequence[Choice], usage: Usage) -> Payload: ...


@dataclass
class _Ids:
    model: str
    object: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.fingerprint = system_fingerprint(self.model)  # once per response, not per token

    def adopt(self, upstream_chunk: str) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            chunk = json.loads(upstream_chunk)
            self.id = str(chunk.get("id") or self.id)
            self.created = int(chunk.get("created") or self.created)
            self.fingerprint = str(chunk.get("system_fingerprint") or self.fingerprint)

    def chunk(self, choices: list[Payload], usage: Usage | None = None) -> Payload:
        # Stream chunks are built as plain dicts: they are sent once per token, pydantic adds nothing here.
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices,
                "usage": usage.model_dump() if usage is not None else None}


def _call_delta(piece: ToolCallDelta) -> Payload:
    if piece.id is not None:
        return {"index": piece.index, "id": piece.id, "type": "function",
                "function": {"name": piece.name or "", "arguments": piece.arguments}}
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


class ChatFormatter:
    def __init__(self, model: str, want_logprobs: bool, n: int = 1) -> None:
        self._ids = _Ids(model, "chat.completion.chunk", id=f"chatcmpl-{uuid.uuid4().hex}")
        self._want_logprobs = want_logprobs
        self._n = n

    def _logprobs(self, logprobs: Sequence[TokenLogprob] | None) -> ChatLogprobs | None:
        if not self._want_logprobs or logprobs is None:
            return None
        return ChatLogprobs(content=[
            TokenLogprobEntry(
                token=lp.token, logprob=lp.logprob, bytes=list(lp.token_bytes) or None,
                top_logprobs=[{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top],
            )
            for lp in logprobs
        ])

    def adopt(self, upstream_chunk: str) -> None:
        self._ids.adopt(upstream_chunk)

    def opening_chunks(self) -> list[Payload]:
        return [self._ids.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(self._n)]

    def chunk(self, delta: Delta) -> Payload:
        lp = self._logprobs(delta.logprobs)
        body: Payload = {"content": delta.text} if delta.text else {}
        if delta.tool_calls:
            body["tool_calls"] = [_call_delta(piece) for piece in delta.tool_calls]
        return self._ids.chunk([{"index": delta.index, "delta": body,
                                 "logprobs": lp.model_dump() if lp is not None else None,
                                 "finish_reason": _finish(delta.finish_reason)}])

    def usage_chunk(self, usage: Usage) -> Payload:
        return self._ids.chunk([], usage)

    def _choice(self, choice: Choice) -> ChatChoice:
        calls = [ToolCallOut(id=c.id, function=CalledFunction(name=c.name, arguments=c.arguments))
                 for _, c in sorted(choice.calls.items())]
        message = AssistantMessage(content=None if calls and not choice.text else choice.text,
                                   tool_calls=calls or None)
        return ChatChoice(index=choice.index, message=message, logprobs=self._logprobs(choice.logprobs),
                          finish_reason=_finish(choice.finish_reason))

    def response(self, choices: Sequence[Choice], usage: Usage) -> Payload:
        ids = self._ids
        return ChatCompletionResponse(id=ids.id, created=ids.created, model=ids.model,
                                      choices=[self._choice(c) for c in choices], usage=usage,
                                      system_fingerprint=system_fingerprint(ids.model)).model_dump()


class CompletionFormatter:
    def __init__(self, model: str, want_logprobs: bool, echo_prompt: str | None, n: int = 1) -> None:
        self._ids = _Ids(model, "text_completion", id=f"cmpl-{uuid.uuid4().hex}")
        self._want_logprobs = want_logprobs
        self._echo = echo_prompt
        self._n = n
        self._offsets: dict[int, int] = {}

    def _logprobs(self, logprobs: Sequence[TokenLogprob] | None, index: int) -> CompletionLogprobs | None:
        if not self._want_logprobs or logprobs is None:
            return None
        offsets = []
        offset = self._offsets.get(index, 0)
        for lp in logprobs:
            offsets.append(offset)
            offset += len(lp.token)
        self._offsets[index] = offset
        tops = [dict(lp.top) for lp in logprobs] if any(lp.top for lp in logprobs) else None
        return CompletionLogprobs(tokens=[lp.token for lp in logprobs],
                                  token_logprobs=[lp.logprob for lp in logprobs],
                                  top_logprobs=tops, text_offset=offsets)

    def adopt(self, upstream_chunk: str) -> None:
        self._ids.adopt(upstream_chunk)

    def opening_chunks(self) -> list[Payload]:
        if not self._echo:
            return []
        return [self._ids.chunk([{"index": i, "text": self._echo, "logprobs": None, "finish_reason": None}])
                for i in range(self._n)]

    def chunk(self, delta: Delta) -> Payload:
        lp = self._logprobs(delta.logprobs, delta.index)
        return self._ids.chunk([{"index": delta.index, "text": delta.text,
                                 "logprobs": lp.model_dump() if lp is not None else None,
                                 "finish_reason": _finish(delta.finish_reason)}])

    def usage_chunk(self, usage: Usage) -> Payload:
        return self._ids.chunk([], usage)

    def response(self, choices: Sequence[Choice], usage: Usage) -> Payload:
        ids = self._ids
        out = [CompletionChoice(index=c.index, text=(self._echo or "") + c.text,
                                logprobs=self._logprobs(c.logprobs, c.index),
                                finish_reason=_finish(c.finish_reason))
               for c in choices]
        return CompletionResponse(id=ids.id, created=ids.created, model=ids.model, choices=out, usage=usage,
                                  system_fingerprint=system_fingerprint(ids.model)).model_dump()
