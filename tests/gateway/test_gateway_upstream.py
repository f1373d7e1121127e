"""The `openai` backend: edgeserve in front of another real server on loopback (edgeserve itself, and
llama-cpp-python's own server when its extras are installed), plus admission (429) on a one-slot gateway."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from loadtest.servers import ServerProcess, free_port, metric_values, start_llama_cpp_server
from quantize.bundled import smollm2_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream(shared_embedded_server: ServerProcess) -> ServerProcess:
    return shared_embedded_server


@pytest.fixture(scope="module")
def proxy(upstream: ServerProcess, edgeserve) -> Iterator[ServerProcess]:
    """A one-slot, one-queue-place gateway whose backend is the embedded server above."""
    server = edgeserve(
        "--backend", "openai", "--upstream", upstream.url + "/v1", "--parallel", "1", "--max-queue", "1"
    )
    yield server
    server.stop()


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def test_proxy_reports_the_upstream_model(proxy: ServerProcess, upstream: ServerProcess) -> None:
    assert _client(proxy).models.list().data[0].id == _client(upstream).models.list().data[0].id
    ready = httpx.get(proxy.url + "/ready").json()
    assert ready["backend"] == "openai" and ready["n_ctx"] > 0


def test_proxy_answers_like_the_upstream(proxy: ServerProcess, upstream: ServerProcess) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    direct = _client(upstream).chat.completions.create(
        model="edgeserve", messages=messages, temperature=0, max_tokens=20
    )
    proxied = _client(proxy).chat.completions.create(
        model="edgeserve", messages=messages, temperature=0, max_tokens=20
    )
    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.usage == direct.usage
    chunks = list(
        _client(proxy).chat.completions.create(
            model="edgeserve",
            messages=messages,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == direct.choices[0].message.content
    )
    assert chunks[-1].usage == direct.usage
    text = _client(proxy).completions.create(
        model="edgeserve", prompt="One, two,", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert text.choices[0].finish_reason == "length" and text.usage and text.usage.completion_tokens == 6


def test_proxy_maps_upstream_context_errors(proxy: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _client(proxy).chat.completions.create(
            model="edgeserve", messages=[{"role": "user", "content": "word " * 6000}], max_tokens=4
        )
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


def test_unreachable_upstream_is_503_with_retry_after(edgeserve) -> None:
    gateway = edgeserve(
        "--backend", "openai", "--upstream", f"http://127.0.0.1:{free_port()}", ready_path="/health"
    )
    try:
        ready = httpx.get(gateway.url + "/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        answer = httpx.post(gateway.url + "/v1/completions",
                            json={"model": "edgeserve", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "model_not_ready"
        with pytest.raises(openai.APIStatusError) as info:
            openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0).completions.create(
                model="edgeserve", prompt="hi", max_tokens=2
            )
        assert info.value.status_code == 503
    finally:
        gateway.stop()


def test_request_timeout(upstream: ServerProcess, edgeserve) -> None:
    """EDGESERVE_REQUEST_TIMEOUT_S bounds a request: 504 before the answer starts, an error event after."""
    gateway = edgeserve(
        "--backend", "openai", "--upstream", upstream.url, env={"EDGESERVE_REQUEST_TIMEOUT_S": "1"}
    )
    body = {"model": "edgeserve", "prompt": "Tell a long story.", "max_tokens": 1000, "ignore_eos": True}
    try:
        late = httpx.post(gateway.url + "/v1/completions", json=body, timeout=60)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        with httpx.stream(
            "POST", gateway.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert '"code":"timeout"' in events[-2] and events[-1] == "data: [DONE]"
    finally:
        gateway.stop()
    # The abandoned generations were cancelled on the upstream as well.
    deadline = time.monotonic() + 30
    while metric_values(upstream.url).get("edgeserve_engine_running_sequences") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


async def _hold_stream(url: str, started: asyncio.Event) -> None:
    body = {"model": "edgeserve", "prompt": "Tell a long story.", "max_tokens": 1000, "stream": True,
            "ignore_eos": True}
    async with (
        httpx.AsyncClient(timeout=600) as client,
        client.stream("POST", url + "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        started.set()
        async for _ in response.aiter_lines():
            pass


def test_full_queue_is_429_with_retry_after(proxy: ServerProcess, upstream: ServerProcess) -> None:
    async def scenario() -> httpx.Response:
        first_started, second_started = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(_hold_stream(proxy.url, first_started))
        await asyncio.wait_for(first_started.wait(), 120)
        second = asyncio.create_task(_hold_stream(proxy.url, second_started))
        deadline = time.monotonic() + 30
        while metric_values(proxy.url).get("edgeserve_queue_depth") != 1.0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=60) as client:
            refused = await client.post(proxy.url + "/v1/completions",
                                        json={"model": "edgeserve", "prompt": "hi", "max_tokens": 2})
        for task in (first, second):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        return refused

    refused = asyncio.run(scenario())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    # Closing the client streams cancelled the proxied generations on the upstream too.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric_values(upstream.url).get("edgeserve_engine_running_sequences") == 0:
            break
        time.sleep(0.1)
    assert metric_values(upstream.url)["edgeserve_engine_running_sequences"] == 0
    assert (
        'edgeserve_rejected_requests_total{reason="queue_full"} 1.0' in httpx.get(proxy.url + "/metrics").text
    )


def test_queue_wait_timeout_is_408_with_retry_after(upstream: ServerProcess, edgeserve) -> None:
    """A request that waited EDGESERVE_QUEUE_TIMEOUT_S for a slot gets 408 (the SDK retries it)."""
    gateway = edgeserve(
        "--backend", "openai", "--upstream", upstream.url + "/v1", "--parallel", "1", "--max-queue", "1",
        env={"EDGESERVE_QUEUE_TIMEOUT_S": "0.5"},
    )

    async def scenario() -> httpx.Response:
        started = asyncio.Event()
        holder = asyncio.create_task(_hold_stream(gateway.url, started))
        await asyncio.wait_for(started.wait(), 120)
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "edgeserve", "prompt": "hi", "max_tokens": 2}
            waited = await client.post(gateway.url + "/v1/completions", json=body)
        holder.cancel()
        with contextlib.suppress(BaseException):
            await holder
        return waited

    try:
        waited = asyncio.run(scenario())
    finally:
        gateway.stop()
    assert waited.status_code == 408
    assert waited.headers["retry-after"] == "1"
    assert waited.json()["error"]["code"] == "queue_timeout"


def _has_llama_cpp_server() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("sse_starlette", "starlette_context"))


@pytest.fixture(scope="module")
def llama_cpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not _has_llama_cpp_server():
        pytest.skip("llama-cpp-python's server needs sse-starlette and starlette-context (test extras)")
    log_path = tmp_path_factory.mktemp("llama_cpp_server") / "server.log"
    server = start_llama_cpp_server(smollm2_path(), free_port(), log_path, n_ctx=1024)
    server.wait_ready("/v1/models")
    yield server
    server.stop()


def test_proxy_in_front_of_llama_cpp_python_server(llama_cpp_server: ServerProcess, edgeserve) -> None:
    gateway = edgeserve("--backend", "openai", "--upstream", llama_cpp_server.url, "--ctx", "1024")
    try:
        messages = [{"role": "user", "content": "Name three colors."}]
        direct = _client(llama_cpp_server).chat.completions.create(
            model="edgeserve", messages=messages, temperature=0, max_tokens=16
        )
        proxied = _client(gateway).chat.completions.create(
            model="edgeserve", messages=messages, temperature=0, max_tokens=16
        )
        assert proxied.choices[0].message.content == direct.choices[0].message.content
        streamed = list(
            _client(gateway).completions.create(
                model="edgeserve", prompt="The sky is", temperature=0, max_tokens=8, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices)
        with pytest.raises(openai.BadRequestError) as info:
            _client(gateway).chat.completions.create(
                model="edgeserve", messages=[{"role": "user", "content": "a " * 3000}], max_tokens=8
            )
        assert info.value.code == "context_length_exceeded"
    finally:
        gateway.stop()
