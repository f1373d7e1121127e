"""The response bodies edgeserve sends, with the fields and types OpenAI's schema requires (stream chunks
are built as plain dicts in formatting.py, in the same shapes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer
from pydantic.functional_serializers import SerializerFunctionWrapHandler

from server.gateway.schemas.base import Wire


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(Wire):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(Wire):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class _Answer(Wire):
    """What every completion answer carries besides its object name and choices."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    system_fingerprint: str


class CompletionResponse(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TokenLogprobEntry(Wire):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatLogprobs(Wire):
    content: list[TokenLogprobEntry] | None = None
    refusal: list[TokenLogprobEntry] | None = None


class CalledFunction(Wire):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(Wire):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    annotations: list[Any] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _no_null_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI leaves tool_calls out when there are none; its schema has no null for it.
        out: dict[str, Any] = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(Wire):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    service_tier: str = "default"


class ModelCard(Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgeserve"
    max_model_len: int | None = None
    # What a request that leaves a sampling field out gets (the `sampling_defaults` setting).
    sampling_defaults: dict[str, float | int] | None = None


class ModelList(Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(Wire):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI sends it


class EmbeddingUsage(Wire):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Wire):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorDetail(Wire):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Wire):
    error: ErrorDetail
