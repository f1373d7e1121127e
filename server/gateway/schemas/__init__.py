"""OpenAI wire shapes: what the gateway accepts (requests, messages, tools) and what it sends (responses)."""

from server.gateway.schemas.base import Request, Wire, refused, unencodable_at
from server.gateway.schemas.messages import UNSUPPORTED_PARTS, ChatMessage, TextPart, arguments_object
from server.gateway.schemas.requests import (
    MAX_CHOICES,
    MAX_STOP_SEQUENCES,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingFields,
    StreamOptions,
)
from server.gateway.schemas.responses import (
    AssistantMessage,
    CalledFunction,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Embedding,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenLogprobEntry,
    ToolCallOut,
    Usage,
)
from server.gateway.schemas.tools import (
    FunctionDefinition,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
)

__all__ = [
    "MAX_CHOICES", "MAX_STOP_SEQUENCES", "UNSUPPORTED_PARTS", "AssistantMessage", "CalledFunction",
    "ChatChoice",
    "ChatCompletionRequest", "ChatCompletionResponse", "ChatLogprobs", "ChatMessage", "CompletionChoice",
    "CompletionLogprobs", "CompletionRequest", "CompletionResponse", "Embedding", "EmbeddingRequest",
    "EmbeddingResponse", "EmbeddingUsage", "ErrorDetail", "ErrorResponse", "FunctionDefinition",
    "JsonSchemaFormat", "ModelCard", "ModelList", "NamedToolChoice", "Request", "ResponseFormat",
    "SamplingFields", "StreamOptions", "TextPart", "TokenLogprobEntry", "Tool", "ToolCall", "ToolCallOut",
    "ToolChoice", "Usage", "Wire", "arguments_object", "refused", "unencodable_at",
]
