"""Gateway parts that need no model: admission, schemas, upstream error mapping, request bodies, metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.engine.types import SamplingParams
from server.gateway.admission import Admission, QueueFullError, QueueTimeoutError
from server.gateway.backends.base import (
    BackendError,
    BackendStats,
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
from server.gateway.metrics import GatewayMetrics
from server.gateway.schemas import ChatCompletionRequest, CompletionRequest
from server.gateway.settings import GatewaySettings

# --- admission ----------------------------------------------------------------------------------------------


def test_admission_runs_limit_queues_then_refuses() -> None:
    async def scenario() -> None:
        gate = Admission(limit=2, max_queue=1)
        first = await gate.acquire()
        await gate.acquire()
        queued = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert gate.snapshot().waiting == 1 and gate.in_flight == 2
        with pytest.raises(QueueFullError):
            await gate.acquire()
        first.release()
        first.release()  # idempotent
        lease = await asyncio.wait_for(queued, 1)
        assert gate.in_flight == 2 and gate.waiting == 0
        lease.release()
        assert gate.in_flight == 1

    asyncio.run(scenario())


def test_admission_is_fifo() -> None:
    async def scenario() -> list[int]:
        gate = Admission(limit=1, max_queue=5)
        held = await gate.acquire()
        order: list[int] = []

        async def waiter(i: int) -> None:
            lease = await gate.acquire()
            order.append(i)
            lease.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
        await asyncio.sleep(0)
        held.release()
        await asyncio.gather(*tasks)
        assert gate.in_flight == 0
        return order

    assert asyncio.run(scenario()) == [0, 1, 2, 3]


def test_admission_timeout_and_cancel_do_not_leak_slots() -> None:
    async def scenario() -> None:
        gate = Admission(limit=1, max_queue=2)
        held = await gate.acquire()
        with pytest.raises(QueueTimeoutError):
            await gate.acquire(timeout_s=0.01)
        cancelled = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert gate.waiting == 0
        held.release()
        assert gate.in_flight == 0
        again = await asyncio.wait_for(gate.acquire(), 1)
        again.release()

    asyncio.run(scenario())


# --- request schemas ----------------------------------------------------------------------------------------


def test_chat_request_accepts_openai_and_llama_cpp_fields() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "x",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": "hi"},
            ],
            "max_completion_tokens": 9,
            "stop": "END",
            "top_k": 40,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "ignored on purpose",
        }
    )
    assert req.effective_max_tokens == 9
    assert req.stop_tuple() == ("END",)
    assert req.wants_usage_chunk
    assert req.messages[0].as_template_dict() == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    "bad",
    [
        {"n": 17},
        {"unknown_field": 1},
        {"max_tokens": "8"},
        {"max_tokens": True},
        {"stream": "yes"},
        {"model": None},
        {"temperature": "0.5"},
        {"temperature": 2.5},
        {"top_p": 0},
        {"max_tokens": 0},
        {"messages": []},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"presence_penalty": 3},
    ],
)
def test_chat_request_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                              **bad})


def test_completion_request_single_prompt_only() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["one"]}).prompt_text() == "one"
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[5, 6]]}).prompt_tokens() == (5, 6)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": ["one", "two"]})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 2})
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 2, "n": 2}).n == 2


def test_settings_need_an_upstream_for_the_openai_backend() -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(backend="openai")
    assert GatewaySettings(backend="openai", upstream_url="http://127.0.0.1:1").engine.n_parallel == 4
    assert GatewaySettings().host == "127.0.0.1"


def test_the_engines_settings_nest_under_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("EDGESERVE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EDGESERVE_ENGINE__N_CTX", "1024")
    monkeypatch.setenv("EDGESERVE_ENGINE__KV_UNIFIED", "true")
    monkeypatch.setenv("EDGESERVE_MAX_QUEUE", "5")
    settings = GatewaySettings(engine={"n_parallel": 2})  # merged field by field with the environment
    assert (settings.engine.n_ctx, settings.engine.kv_unified, settings.engine.n_parallel) == (1024, True, 2)
    assert settings.max_queue == 5
    # an upstream's context is only what was given; the engine's default is no statement about it
    assert settings.upstream_n_ctx == 1024
    monkeypatch.delenv("EDGESERVE_ENGINE__N_CTX")
    assert GatewaySettings().upstream_n_ctx is None


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


# --- metrics ------------------------------------------------------------------------------------------------


class _StatsBackend:
    name = "stub"
    n_ctx = 128
    slots = 2

    def is_ready(self) -> bool:
        return True

    def stats(self) -> BackendStats:
        return BackendStats(
            running=2,
            waiting=1,
            kv_used_cells=30,
            kv_total_cells=120,
            preemptions_total=4,
            steps_total=10,
            batch_size_steps={1: 4, 2: 6},
            step_tokens_steps={2: 10},
        )


def test_metrics_render_engine_histograms_per_registry() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.bind(Admission(2, 3), _StatsBackend())  # type: ignore[arg-type]
    first.observe_request("/v1/completions", 200)
    text = first.render().decode()
    assert 'edgeserve_engine_batch_size_bucket{le="1.0"} 4.0' in text
    assert 'edgeserve_engine_batch_size_bucket{le="2.0"} 10.0' in text
    assert "edgeserve_engine_batch_size_sum 16.0" in text
    assert "edgeserve_kv_cache_usage_ratio 0.25" in text
    assert "edgeserve_preemptions_total 4.0" in text
    assert 'edgeserve_requests_total{route="/v1/completions",status="200"} 1.0' in text
    # Separate registries: a second app in the same process starts from zero.
    assert "edgeserve_requests_total{" not in second.render().decode()


# --- command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model.gguf"], "model file not found"),
        (["--backend", "openai"], "upstream"),
        (["--parallel", "0"], "parallel"),
        (["--chain", "/nonexistent/chain.yaml"], "chain config not found: /nonexistent/chain.yaml"),
    ],
)
def test_serve_refuses_bad_input_with_one_line(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli.serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


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
