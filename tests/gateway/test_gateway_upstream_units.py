"""The upstream side without a model or a server: error mapping, request bodies, stream parsing, each
dialect's words, and choices merged from a server without n."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.engine.types import SamplingParams
from server.gateway.backends.base import (
    BackendError,
    BackendUnavailableError,
    ContextLengthExceededError,
    Delta,
    GenerationJob,
)
from server.gateway.backends.dialects import DIALECTS
from server.gateway.backends.fanout import merged_choices
from server.gateway.backends.features import OutputConstraint
from server.gateway.backends.upstream_errors import is_error_payload, map_error
from server.gateway.backends.upstream_protocol import EmptyStreamError, request_body, stream_deltas

# --- upstream errors ----------------------------------------------------------------------------------------

# llama-server's body for a prompt over the slot's context: format_error_response(msg,
# ERROR_TYPE_EXCEED_CONTEXT_SIZE) plus n_prompt_tokens / n_ctx (server_task_result_error::to_json).
LLAMA_SERVER_CONTEXT = {
    "error": {
        "code": 400,
        "message": "request (4476 tokens) exceeds the available context size "
        "(4096 tokens), try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 4476,
        "n_ctx": 4096,
    }
}


def test_llama_server_context_error_maps_to_context_length_exceeded() -> None:
    err = map_error(400, LLAMA_SERVER_CONTEXT, "chat")
    assert isinstance(err, ContextLengthExceededError)
    assert err.status_code == 400 and err.code == "context_length_exceeded" and err.param == "messages"
    assert "4096" in err.message and not err.retryable


def _sglang_error(message: str, status: int) -> dict[str, object]:
    protocol = pytest.importorskip("sglang.srt.entrypoints.openai.protocol", reason="sglang is not installed")
    # What OpenAIServingBase.create_error_response puts in the body (flat, `object: "error"`, integer code).
    body: dict[str, object] = protocol.ErrorResponse(
        object="error", message=message, type="BadRequest", param=None, code=status
    ).model_dump()
    return body


def test_sglang_flat_errors_map_to_the_openai_shape() -> None:
    # SGLang's own wording (TokenizerManager._validate_one_request) for prompt + max_tokens over the context.
    too_long = _sglang_error(
        "Requested token count exceeds the model's maximum context length of 4096 tokens. "
        "You requested a total of 5000 tokens: 4000 tokens from the input messages and "
        "1000 tokens for the completion.",
        400,
    )
    assert is_error_payload(too_long)
    err = map_error(400, too_long, "completion")
    assert isinstance(err, ContextLengthExceededError) and err.param == "prompt"
    other = map_error(400, _sglang_error("top_p must be in (0, 1]", 400), "chat")
    assert type(other) is BackendError and other.status_code == 400 and not other.retryable
    assert "top_p" in other.message


def test_upstream_status_classes() -> None:
    assert isinstance(
        map_error(503, {"error": {"message": "Loading model"}}, "chat"), BackendUnavailableError
    )
    busy = map_error(429, None, "chat", text="slow down")
    assert busy.status_code == 429 and busy.retryable
    crashed = map_error(500, {"error": {"message": "CUDA error"}}, "chat")
    assert crashed.status_code == 502 and crashed.retryable
    auth = map_error(401, {"error": {"message": "Invalid API Key"}}, "chat")
    assert auth.status_code == 502 and not auth.retryable
    assert not is_error_payload({"id": "x", "choices": [], "usage": {"prompt_tokens": 1}})


def test_upstream_request_body_carries_both_extras_spellings() -> None:
    params = SamplingParams(
        max_tokens=5,
        temperature=0.0,
        top_k=40,
        min_p=0.1,
        repeat_penalty=1.2,
        seed=3,
        stop=("x",),
        ignore_eos=True,
        logprobs=2,
    )
    job = GenerationJob(
        kind="chat",
        params=params,
        messages=({"role": "user", "content": "hi"},),
        continuation="Hel",
        extra={"max_tokens_explicit": False},
    )
    body = request_body(job, "m", dialect=DIALECTS["llama-server"])
    assert body["messages"][-1] == {"role": "assistant", "content": "Hel"}
    assert "max_tokens" not in body
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.2
    assert body["top_k"] == 40 and body["ignore_eos"] is True and body["seed"] == 3
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    completion = request_body(
        GenerationJob(
            kind="completion",
            params=params,
            prompt="a",
            continuation="b",
            extra={"max_tokens_explicit": False},
        ),
        "m",
    )
    assert completion["prompt"] == "ab" and completion["max_tokens"] == 5 and completion["logprobs"] == 2


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


def _collect(job: GenerationJob, *lines: str) -> list[Delta]:
    async def run() -> list[Delta]:
        return [d async for d in stream_deltas(_lines(*lines), job)]

    return asyncio.run(run())


CHAT_JOB = GenerationJob(
    kind="chat", params=SamplingParams(max_tokens=4), messages=({"role": "user", "content": "x"},)
)


def test_stream_deltas_puts_the_finish_last_with_usage_counts() -> None:
    deltas = _collect(
        CHAT_JOB,
        'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        "",
        'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}',
        "",
        'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"length"}]}',
        "",
        'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}',
        "",
        "data: [DONE]",
    )
    assert [d.text for d in deltas] == ["Hel", "lo", ""]
    assert deltas[-1].finish_reason == "length"
    assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (7, 2)


def test_stream_deltas_raise_upstream_errors() -> None:
    # SGLang's streaming error: data: {"error": ErrorResponse} with an integer code.
    sglang = (
        'data: {"error":{"object":"error","message":"The input (5000 tokens) is longer than the model\'s '
        'context length (4096 tokens).","type":"BadRequest","param":null,"code":400}}'
    )
    with pytest.raises(ContextLengthExceededError):
        _collect(CHAT_JOB, sglang)
    # llama-server's SSE error event.
    with pytest.raises(BackendError) as info:
        _collect(CHAT_JOB, 'error: {"code":500,"message":"slot unavailable","type":"server_error"}')
    assert info.value.status_code == 502
    with pytest.raises(EmptyStreamError):
        _collect(CHAT_JOB)
    with pytest.raises(BackendError) as info:
        _collect(CHAT_JOB, 'data: {"choices":[{"index":0,"delta":{"content":"cut"}}]}')
    assert info.value.code == "upstream_truncated"


# --- upstream dialects --------------------------------------------------------------------------------------


def _constrained_job(kind: str, constraint: OutputConstraint, **extra: object) -> GenerationJob:
    params = SamplingParams(max_tokens=4, top_k=0, min_p=0.0, logit_bias=((7, float("-inf")),))
    return GenerationJob(kind=kind, params=params,  # type: ignore[arg-type]
                         messages=({"role": "user", "content": "x"},), prompt="x", constraint=constraint,
                         **extra)  # type: ignore[arg-type]


def test_each_dialect_gets_constraints_and_top_k_in_its_own_words() -> None:
    schema = OutputConstraint(kind="json_schema", grammar="root ::= \"{}\"", schema={"type": "object"},
                              name="thing", strict=True)
    grammar = OutputConstraint(kind="grammar", grammar='root ::= "a"')
    llama = request_body(_constrained_job("chat", schema), "m", dialect=DIALECTS["llama-server"])
    assert llama["json_schema"] == {"type": "object"} and llama["top_k"] == 0 and llama["min_p"] == 0.0
    assert llama["logit_bias"] == {"7": -100.0} and "response_format" not in llama
    sglang = request_body(_constrained_job("completion", schema), "m", dialect=DIALECTS["sglang"])
    assert sglang["top_k"] == -1 and "min_p" not in sglang
    assert sglang["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "thing", "schema": {"type": "object"}, "strict": True}}
    sglang_chat = request_body(_constrained_job("chat", grammar), "m", dialect=DIALECTS["sglang"])
    assert sglang_chat["ebnf"] == 'root ::= "a"'
    with pytest.raises(BackendError) as info:
        request_body(_constrained_job("completion", schema), "m", dialect=DIALECTS["openai"])
    assert info.value.status_code == 400
    plain = request_body(_constrained_job("chat", grammar, n=3), "m", dialect=DIALECTS["edgeserve"])
    assert plain["n"] == 3 and plain["grammar"] == 'root ::= "a"'


def test_choices_from_a_server_without_n_come_merged_by_index() -> None:
    seen: list[int | None] = []

    async def one(job: GenerationJob) -> AsyncIterator[Delta]:
        seen.append(job.params.seed)
        yield Delta(text=f"s{job.params.seed}")
        yield Delta(text="", finish_reason="stop", completion_tokens=1)

    async def run() -> list[Delta]:
        job = GenerationJob(kind="completion", params=SamplingParams(max_tokens=2, seed=10), prompt="x", n=3)
        return [d async for d in merged_choices(job, one)]

    deltas = asyncio.run(run())
    assert sorted(seen) == [10, 11, 12]  # type: ignore[type-var]
    assert {d.index: d.text for d in deltas if d.text} == {0: "s10", 1: "s11", 2: "s12"}
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1, 2]
