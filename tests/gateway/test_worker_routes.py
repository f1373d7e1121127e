"""The gateway as a worker of sglang-router: the model id, capacity and load it reports, in SGLang's shapes
(the router's own parsing is exercised through a real router in tests/launch/test_router_cluster.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import openai

from loadtest.servers import ServerProcess, metric_value
from server.gateway.admission import AdmissionSnapshot
from server.gateway.backends.base import BackendStats
from server.gateway.worker_load import worker_load

EMBEDDED_PARALLEL = 8  # tests/gateway/conftest.py
EMBEDDED_CTX = 1024


def test_server_and_model_info_name_the_served_model(shared_embedded_server: ServerProcess) -> None:
    url = shared_embedded_server.url
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(url + path, timeout=10).json()
        assert info["served_model_name"] == model
        assert (info["max_running_requests"], info["context_length"]) == (EMBEDDED_PARALLEL, EMBEDDED_CTX)
        assert info["max_total_num_tokens"] == EMBEDDED_PARALLEL * EMBEDDED_CTX and info["dp_size"] == 1
        # Given either, the router would try to load a tokenizer from it (from a hub for a bare name).
        assert "model_path" not in info and "tokenizer_path" not in info
    for path in ("/model_info", "/get_model_info"):
        assert httpx.get(url + path, timeout=10).json() == {"served_model_name": model, "is_generation": True}


def test_load_counts_running_requests(shared_embedded_server: ServerProcess) -> None:
    url = shared_embedded_server.url
    idle = httpx.get(url + "/get_load", timeout=10).json()
    assert idle == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]

    async def busy() -> tuple[list[dict[str, int]], dict[str, object]]:
        client = httpx.AsyncClient(base_url=url, timeout=120)
        lines: list[AsyncIterator[str]] = []
        async with client, contextlib.AsyncExitStack() as stack:
            for i in range(2):
                body = {"model": "edgeserve", "max_tokens": 256, "ignore_eos": True, "stream": True,
                        "messages": [{"role": "user", "content": f"Tell story {i}."}]}
                response = await stack.enter_async_context(client.stream("POST", "/v1/chat/completions",
                                                                         json=body))
                lines.append(response.aiter_lines())  # kept: a dropped reader closes its stream
                while not (await anext(lines[-1])).startswith("data:"):  # the first chunk: it is running
                    pass
            load = (await client.get("/get_load")).json()
            loads = (await client.get("/v1/loads")).json()
            return load, loads

    load, loads = asyncio.run(busy())
    assert load[0]["num_reqs"] == 2 and load[0]["num_tokens"] > 0, (load, loads)
    core = loads["loads"][0]  # type: ignore[index]
    assert core["num_running_reqs"] == 2 and core["num_total_tokens"] == load[0]["num_tokens"]
    assert 0 < core["token_usage"] <= 1 and core["max_running_requests"] == EMBEDDED_PARALLEL


def test_prefix_reuse_is_counted(shared_embedded_server: ServerProcess) -> None:
    url = shared_embedded_server.url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    system = "You answer for the lighthouse keepers' guild. " * 20

    def reused() -> float:
        text = httpx.get(url + "/metrics", timeout=10).text
        return metric_value(text, "edgeserve_prefix_reused_tokens_total")

    before = reused()
    for question in ("Who are you?", "What do you keep?"):
        client.chat.completions.create(model="edgeserve", max_tokens=2, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}])
    assert reused() - before >= 100  # the second request took the system prompt from the first one's cells


def _snap(in_flight: int, waiting: int, limit: int = 4) -> AdmissionSnapshot:
    return AdmissionSnapshot(in_flight=in_flight, waiting=waiting, limit=limit, max_queue=8)


def test_load_in_tokens_with_and_without_kv_figures() -> None:
    # The engine reports its KV cells: those are the running load; a queued request counts a whole context.
    stats = BackendStats(waiting=1, kv_used_cells=300, kv_total_cells=4096)
    load = worker_load(_snap(3, 2), stats, n_ctx=1024)
    assert (load.running, load.waiting) == (2, 3)
    assert (load.used_tokens, load.total_tokens, load.max_total_tokens) == (300, 300 + 3 * 1024, 4096)
    # A remote backend reports none: a running request counts a whole context too.
    remote = worker_load(_snap(2, 1), BackendStats(), n_ctx=512)
    assert (remote.used_tokens, remote.total_tokens, remote.max_total_tokens) == (1024, 1536, 2048)
    assert remote.token_usage == 0.5
    assert worker_load(_snap(0, 0), BackendStats(), n_ctx=0).token_usage == 0.0
