"""The OpenAI API of `edgeserve serve` (embedded engine, bundled SmolLM2) via the official openai client."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from loadtest.servers import ServerProcess, metric_values

pytestmark = pytest.mark.slow

COLORS = {
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "purple",
    "pink",
    "black",
    "white",
    "brown",
    "gray",
    "grey",
    "violet",
    "indigo",
    "cyan",
    "magenta",
}


@pytest.fixture(scope="module")
def server(shared_embedded_server: ServerProcess) -> ServerProcess:
    return shared_embedded_server


@pytest.fixture(scope="module")
def client(embedded_client: openai.OpenAI) -> openai.OpenAI:
    return embedded_client


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_health_ready_and_models(server: ServerProcess, client: openai.OpenAI) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["slots"] == 8
    models = client.models.list().data
    # The model's own id first, then the alias the README's examples send.
    assert [m.id for m in models][1:] == ["edgeserve"] and "SmolLM2" in models[0].id


def test_chat_names_three_colors(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=_model(client),
        messages=[{"role": "user", "content": "Name three colors."}],
        temperature=0,
        max_tokens=40,
    )
    text = reply.choices[0].message.content or ""
    named = {c for c in COLORS if c in text.lower()}
    assert len(named) >= 3, text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streamed_matches_non_streamed_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(
        model=_model(client), messages=messages, temperature=0, max_tokens=24
    )
    stream = client.chat.completions.create(
        model=_model(client),
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    # include_usage: one last chunk with no choices and the counts of the whole answer.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_text_completion_length_limit(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=_model(client),
        prompt="Once upon a time",
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 7
    assert reply.choices[0].text.strip()


def test_text_completion_streamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=_model(client), prompt="The sky is", max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model=_model(client), prompt="The sky is", max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_sequence_and_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=_model(client),
        messages=[{"role": "user", "content": "Count from 1 to 10, comma separated."}],
        temperature=0,
        max_tokens=40,
        stop=["5"],
        logprobs=True,
        top_logprobs=2,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and "5" not in (choice.message.content or "")
    assert choice.logprobs is not None and choice.logprobs.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in choice.logprobs.content)


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=_model(client), messages=[{"role": "user", "content": "hello " * 5000}], max_tokens=8
        )
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=_model(client), prompt="hi", max_tokens=100_000)
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "prompt"


@pytest.mark.parametrize(
    "bad",
    [
        {"n": 17},
        {"temperature": 7},
        {"top_p": 0},
        {"max_tokens": 0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"messages": []},
        {"tool_choice": "required"},
        {"functions": [{"name": "f", "parameters": {}}]},
    ],
)
def test_bad_parameters_are_400(server: ServerProcess, bad: dict[str, object]) -> None:
    body = {"model": "edgeserve", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **bad}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == (None if "tool_choice" in bad else next(iter(bad)))


def test_bad_parameters_through_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=_model(client), messages=[{"role": "user", "content": "hi"}], n=17
        )
    assert info.value.param == "n"


def _one(client: openai.OpenAI, i: int) -> int:
    reply = client.completions.create(
        model=_model(client),
        prompt=f"Story {i}: once upon a time",
        max_tokens=32,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None
    return reply.usage.completion_tokens


def _batch_histogram(url: str) -> tuple[float, float]:
    values = metric_values(url)
    return values.get('edgeserve_engine_batch_size_bucket{le="1.0"}', 0.0), values.get(
        "edgeserve_engine_batch_size_count", 0.0
    )


def test_concurrent_requests_share_engine_steps(server: ServerProcess, client: openai.OpenAI) -> None:
    # Batching shows in the engine's step counter, not in wall time (which a busy machine bends): eight
    # requests one after another take a step per token each; sent together they share steps.
    _one(client, -1)  # warm up
    steps_before = metric_values(server.url)["edgeserve_engine_steps_total"]
    sequential = [_one(client, i) for i in range(8)]
    steps_sequential = metric_values(server.url)["edgeserve_engine_steps_total"] - steps_before

    single_before, total_before = _batch_histogram(server.url)
    steps_before = metric_values(server.url)["edgeserve_engine_steps_total"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        concurrent_tokens = list(pool.map(lambda i: _one(client, i), range(8)))
    steps_concurrent = metric_values(server.url)["edgeserve_engine_steps_total"] - steps_before
    single_after, total_after = _batch_histogram(server.url)

    assert sequential == concurrent_tokens == [32] * 8
    assert steps_sequential >= 8 * 32  # one step per generated token (prefill steps come on top)
    multi_steps = (total_after - total_before) - (single_after - single_before)
    assert multi_steps > 0, "no engine step carried more than one sequence"
    assert steps_concurrent < steps_sequential / 2, (steps_concurrent, steps_sequential)
    values = metric_values(server.url)
    assert values["edgeserve_engine_batch_size_sum"] > values["edgeserve_engine_batch_size_count"]


def test_disconnect_mid_stream_frees_the_sequence(server: ServerProcess, client: openai.OpenAI) -> None:
    cancelled_before = metric_values(server.url).get("edgeserve_cancelled_requests_total", 0.0)
    stream = client.completions.create(
        model=_model(client),
        prompt="Tell me a very long story.",
        max_tokens=1000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    received = 0
    for chunk in stream:
        received += len(chunk.choices[0].text) if chunk.choices else 0
        if received > 10:
            break
    stream.close()
    deadline = time.monotonic() + 30
    values = metric_values(server.url)
    while time.monotonic() < deadline:
        values = metric_values(server.url)
        if (
            values.get("edgeserve_engine_running_sequences") == 0
            and values.get("edgeserve_requests_in_flight") == 0
            and values.get("edgeserve_kv_cache_used_cells") == 0
        ):
            break
        time.sleep(0.1)
    assert values["edgeserve_engine_running_sequences"] == 0
    assert values["edgeserve_requests_in_flight"] == 0
    assert values["edgeserve_kv_cache_used_cells"] == 0
    assert values["edgeserve_cancelled_requests_total"] == cancelled_before + 1
    # The server is still fine afterwards.
    assert _one(client, 99) == 32


def test_metrics_expose_the_serving_figures(server: ServerProcess, client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model=_model(client), messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
    ).close()
    httpx.post(server.url + "/v1/chat/completions",
               json={"model": "edgeserve", "messages": [], "max_tokens": 3})
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "edgeserve_requests_total",
        "edgeserve_time_to_first_token_seconds_bucket",
        "edgeserve_inter_token_latency_seconds_bucket",
        "edgeserve_request_latency_seconds_bucket",
        "edgeserve_prompt_tokens_total",
        "edgeserve_generation_tokens_total",
        "edgeserve_queue_depth",
        "edgeserve_engine_running_sequences",
        "edgeserve_engine_batch_size_bucket",
        "edgeserve_kv_cache_usage_ratio",
        "edgeserve_preemptions_total",
    ):
        assert name in text, name
    assert 'edgeserve_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'route="/v1/chat/completions",status="400"' in text


def test_gpu_info_reports_the_host(server: ServerProcess) -> None:
    info = httpx.get(server.url + "/v1/gpu/info", timeout=30).json()
    assert info["cpu"]["logical_cpus"] >= 1
    if info["is_cpu_only"]:
        assert info["gpus"] == [] and info["reason"]
    else:
        assert info["gpus"][0]["memory_total_bytes"] > 0
