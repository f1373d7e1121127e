"""Deltas -> OpenAI payloads, one formatter per route (chat completions and text completions)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.gateway.backends.base import TokenLogprob
from server.gateway.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprobEntry,
    Usage,
)

Payload = dict[str, Any]


def _finish(reason: str | None) -> str | None:
    # The engine's "cancelled" never reaches a client that is still listening; anything odd reads as "stop".
    if reason is None or reason in ("stop", "length"):
        return reason
    return "stop"


class Formatter(Protocol):
    """Builds one route's response body, stream chunks and usage chunk."""

    def opening_chunks(self) -> list[Payload]: ...

    def chunk(self, text: str, logprobs: Sequence[TokenLogprob], finish_reason: str | None) -> Payload: ...

    def usage_chunk(self, usage: Usage) -> Payload: ...

    def response(self, text: str, logprobs: Sequence[TokenLogprob] | None, finish_reason: str | None,
                 usage: Usage) -> Payload: ...


@dataclass
class _Ids:
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


class ChatFormatter:
    def __init__(self, model: str, want_logprobs: bool) -> None:
        self._ids = _Ids(model, id=f"chatcmpl-{uuid.uuid4().hex}")
        self._want_logprobs = want_logprobs

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

    def _chunk(self, choices: list[Payload], usage: Usage | None = None) -> Payload:
        # Stream chunks are built as plain dicts: they are sent once per token, pydantic adds nothing here.
        ids = self._ids
        return {"id": ids.id, "object": "chat.completion.chunk", "created": ids.created, "model": ids.model,
                "choices": choices, "usage": usage.model_dump() if usage is not None else None}

    def opening_chunks(self) -> list[Payload]:
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def chunk(self, text: str, logprobs: Sequence[TokenLogprob], finish_reason: str | None) -> Payload:
        lp = self._logprobs(logprobs)
        return self._chunk([{"index": 0, "delta": {"content": text} if text else {},
                             "logprobs": lp.model_dump() if lp is not None else None,
                             "finish_reason": _finish(finish_reason)}])

    def usage_chunk(self, usage: Usage) -> Payload:
        return self._chunk([], usage)

    def response(self, text: str, logprobs: Sequence[TokenLogprob] | None, finish_reason: str | None,
                 usage: Usage) -> Payload:
        ids = self._ids
        choice = ChatChoice(message=AssistantMessage(content=text), logprobs=self._logprobs(logprobs),
                            finish_reason=_finish(finish_reason))
        return ChatCompletionResponse(id=ids.id, created=ids.created, model=ids.model, choices=[choice],
                                      usage=usage).model_dump()


class CompletionFormatter:
    def __init__(self, model: str, want_logprobs: bool, echo_prompt: str | None) -> None:
        self._ids = _Ids(model, id=f"cmpl-{uuid.uuid4().hex}")
        self._want_logprobs = want_logprobs
        self._echo = echo_prompt
        self._offset = 0

    def _logprobs(self, logprobs: Sequence[TokenLogprob] | None) -> CompletionLogprobs | None:
        if not self._want_logprobs or logprobs is None:
            return None
        offsets = []
        for lp in logprobs:
            offsets.append(self._offset)
            self._offset += len(lp.token)
        tops = [dict(lp.top) for lp in logprobs] if any(lp.top for lp in logprobs) else None
        return CompletionLogprobs(tokens=[lp.token for lp in logprobs],
                                  token_logprobs=[lp.logprob for lp in logprobs],
                                  top_logprobs=tops, text_offset=offsets)

    def _chunk(self, choices: list[Payload], usage: Usage | None = None) -> Payload:
        ids = self._ids
        return {"id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model,
                "choices": choices, "usage": usage.model_dump() if usage is not None else None}

    def opening_chunks(self) -> list[Payload]:
        if not self._echo:
            return []
        return [self._chunk([{"index": 0, "text": self._echo, "logprobs": None, "finish_reason": None}])]

    def chunk(self, text: str, logprobs: Sequence[TokenLogprob], finish_reason: str | None) -> Payload:
        lp = self._logprobs(logprobs)
        return self._chunk([{"index": 0, "text": text,
                             "logprobs": lp.model_dump() if lp is not None else None,
                             "finish_reason": _finish(finish_reason)}])

    def usage_chunk(self, usage: Usage) -> Payload:
        return self._chunk([], usage)

    def response(self, text: str, logprobs: Sequence[TokenLogprob] | None, finish_reason: str | None,
                 usage: Usage) -> Payload:
        ids = self._ids
        choice = CompletionChoice(text=(self._echo or "") + text, logprobs=self._logprobs(logprobs),
                                  finish_reason=_finish(finish_reason))
        return CompletionResponse(id=ids.id, created=ids.created, model=ids.model, choices=[choice],
                                  usage=usage).model_dump()
