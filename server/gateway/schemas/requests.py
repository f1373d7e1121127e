"""The request bodies of /v1/completions, /v1/chat/completions and /v1/embeddings.

Every field OpenAI defines is either implemented, refused with a 400 that says why (`refused`), or accepted
and ignored on purpose (commented here and listed in the README). llama-server's extras that edgeserve
implements are accepted under llama-server's names (top_k, min_p, repeat_penalty, ignore_eos, grammar,
json_schema).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from server.gateway.schemas.base import Request, only, refused
from server.gateway.schemas.messages import ChatMessage
from server.gateway.schemas.tools import ResponseFormat, Tool, ToolChoice

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_CHOICES = 16  # n: sequences one request may ask for (they share the prompt's KV in the engine)

Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class StreamOptions(Request):
    include_usage: bool = False
    # Ignored on purpose: edgeserve never sends a chunk it would hide.
    include_obfuscation: bool | None = None


class SamplingFields(Request):
    """Fields shared by the generation routes, with llama.cpp's extras."""

    model: Annotated[str, Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    stop: str | list[str] | None = None
    seed: Annotated[int | None, Field(ge=-(2**63), lt=2**63)] = None  # OpenAI's: a 64-bit integer
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    # OpenAI: token id (as a string) -> bias in [-100, 100]; -100 bans the token, +100 forces it.
    logit_bias: dict[str, Bias] | None = None
    # Ignored on purpose: an end-user id for OpenAI's abuse monitoring; edgeserve has none.
    user: str | None = None
    # llama.cpp extras (llama-server takes the same names). top_k -1 or 0: off.
    top_k: Annotated[int | None, Field(ge=-1)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    repeat_penalty: Annotated[float | None, Field(gt=0.0)] = None
    ignore_eos: bool = False
    grammar: Annotated[str | None, Field(min_length=1)] = None
    json_schema: dict[str, Any] | None = None
    # edgeserve's: speculative decoding for this request (None: the server's --spec-type; false: off; true:
    # on, refused where the server was started without it).
    speculative: bool | None = None
    # SGLang's extensions at the values edgeserve's behaviour has: sglang-router writes them into every
    # request it forwards to a worker, so a gateway behind the router must take them; other values: a 400.
    no_stop_trim: Annotated[bool, only(
        False, "no_stop_trim true is not supported: stop sequences are trimmed")] = False
    skip_special_tokens: Annotated[bool, only(
        True, "skip_special_tokens false is not supported: special tokens are not detokenized")] = True
    return_hidden_states: Annotated[bool, only(False, "hidden states are not returned")] = False

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids; {key!r} is not one")
        return value

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """(token id, bias) pairs; OpenAI's -100 (\"a ban\") becomes -inf so the token is never picked."""
        items = (self.logit_bias or {}).items()
        return tuple((int(k), float("-inf") if v <= -100.0 else v) for k, v in items)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
            if any(not s for s in value):
                raise ValueError("stop sequences must not be empty")
        return value

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,) if self.stop else ()
        return tuple(self.stop)

    @property
    def wants_usage_chunk(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: Annotated[int | None, Field(ge=0, le=5)] = None
    best_of: Annotated[int | None, Field(ge=1)] = None
    suffix: Annotated[Any, refused("suffix (fill in the middle) is not supported")] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], str | list) and len(value) != 1:
            raise ValueError("one prompt per request: send a string, a list of one string, or token ids")
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported: ranking candidates server-side would "
                             "hide what was generated; ask for n choices and pick among them")
        return self

    def prompt_text(self) -> str:
        """The prompt when it is text ("" for token ids)."""
        if isinstance(self.prompt, str):
            return self.prompt
        first = self.prompt[0]
        return first if isinstance(first, str) else ""

    def prompt_tokens(self) -> tuple[int, ...] | None:
        """The prompt when it is token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], str):
            return None
        first = self.prompt[0]
        ids = first if isinstance(first, list) else self.prompt
        return tuple(int(t) for t in ids)  # type: ignore[arg-type]


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Ignored on purpose: edgeserve stores no completions (store: true is refused), keys a prefix cache by
    # content on its own (prompt_cache_key) and has one service tier.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    functions: Annotated[Any, refused(
        "functions is OpenAI's deprecated form of tools: send tools (and tool_choice)")] = None
    function_call: Annotated[Any, refused(
        "function_call is OpenAI's deprecated tool_choice: send tool_choice")] = None
    audio: Annotated[Any, refused("audio output is not supported: this model generates text")] = None
    modalities: list[Literal["text"]] | None = None
    prediction: Annotated[Any, refused("predicted outputs are not supported")] = None
    reasoning_effort: Annotated[Any, refused(
        "reasoning_effort is not supported: this model has no reasoning mode")] = None
    verbosity: Annotated[Any, refused("verbosity is not supported")] = None
    web_search_options: Annotated[Any, refused("web search is not supported")] = None
    # SGLang's, as sglang-router sends them (see SamplingFields); the reasoning pair does nothing on a model
    # without a reasoning mode.
    continue_final_message: Annotated[bool, only(
        False, "continue_final_message true is not supported: the reply starts a new assistant turn")] = False
    separate_reasoning: bool = True
    stream_reasoning: bool = True

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("edgeserve does not store completions: send store false or leave it out")
        return value

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        named = self.tool_choice is not None and not isinstance(self.tool_choice, str)
        if (named or self.tool_choice == "required") and not self.tools:
            raise ValueError("tool_choice required or a named function needs tools")
        if named and self.tools:
            wanted = self.tool_choice.function.name  # type: ignore[union-attr]
            if wanted not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {wanted!r}, which is not among tools")
        return self

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(Request):
    """POST /v1/embeddings."""

    model: Annotated[str, Field(min_length=1)]
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[Any, refused(
        "dimensions is not supported: this model's embeddings have one fixed size")] = None
    # Ignored on purpose, as on the generation routes.
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value == [] or value == "":
            raise ValueError("input is empty")
        if isinstance(value, list) and any(x == [] or x == "" for x in value):
            raise ValueError("input holds an empty item")
        return value

    def items(self) -> list[str | tuple[int, ...]]:
        """Each input as text or token ids, in order."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [tuple(value)]  # type: ignore[arg-type]
        return [x if isinstance(x, str) else tuple(x) for x in value]  # type: ignore[arg-type,union-attr]
