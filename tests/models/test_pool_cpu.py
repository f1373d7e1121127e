"""Several models on the CPU within a RAM budget (issue 24's CPU goal), through the official openai client
against `edgeserve serve --models FILE`: the bundled SmolLM2 and a larger Q8_0 variant made by the quantize
pipeline, a budget that holds one of them beside a pinned model but not both.

One server for the module; its tests run in order (each leaves the pool as the next expects).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loadtest.servers import ServerProcess, metric_value, start_edgeserve
from quantize.model.units import MIB
from server.gateway.models.memory_plan import embedded_planned_bytes, where_models_run
from server.gateway.models.models_file import ModelsFile

pytestmark = pytest.mark.slow

SMALL = {"n_ctx": 512, "n_parallel": 2}
IDLE_TTL_S = 3.0


def _entries(variant: Path) -> list[dict[str, Any]]:
    # A model file that goes away after the server planned it (a test removes the link).
    broken = variant.with_name("goes-away.gguf")
    if not broken.is_symlink():
        broken.symlink_to(variant)
    return [
        {"name": "pin", "settings": {"n_ctx": 256, "n_parallel": 1}, "policy": {"pinned": True}},
        {"name": "small", "served_names": ["smollm2"], "settings": SMALL},
        {"name": "large", "path": str(variant), "settings": SMALL, "policy": {"idle_ttl_s": IDLE_TTL_S}},
        {"name": "huge", "path": str(variant), "settings": {"n_ctx": 1024, "n_parallel": 4}},
        {"name": "broken", "path": str(broken), "settings": {"n_ctx": 256, "n_parallel": 1}},
    ]


@pytest.fixture(scope="module")
def planned(larger_variant: Path) -> dict[str, int]:
    """Each model's planned bytes, as the server will plan them (same code, same machine)."""
    models = ModelsFile.model_validate({"models": _entries(larger_variant)})
    where = where_models_run(models.models)
    return {e.name: embedded_planned_bytes(e, where) for e in models.models}


@pytest.fixture(scope="module")
def server(larger_variant: Path, planned: dict[str, int], tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[ServerProcess]:
    # The pinned model and either chat model fit; both chat models together do not; "huge" fits the budget
    # alone but not beside the pinned model, which is never evicted.
    budget = planned["pin"] + max(planned["small"], planned["large"]) + 8 * MIB
    assert planned["pin"] + planned["small"] + planned["large"] > budget
    assert planned["pin"] + planned["huge"] > budget >= planned["huge"]
    folder = tmp_path_factory.mktemp("pool")
    import yaml

    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"budget_mib": -(-budget // MIB), "load_wait_s": 120,
                                    "models": _entries(larger_variant)}))
    srv = start_edgeserve(["--models", str(path)], folder / "serve.log").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    # No retries: every request must be answered the first time.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(client: openai.OpenAI, model: str, max_tokens: int = 4) -> str:
    reply = client.chat.completions.create(model=model, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content
    return reply.model


def _states(server: ServerProcess) -> dict[str, str]:
    data = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    return {m["id"]: m["state"] for m in data}


def _metric(server: ServerProcess) -> Callable[..., float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return lambda name, **labels: metric_value(text, name, **labels)


def test_models_lists_every_model_with_state_and_planned_memory(server: ServerProcess,
                                                                planned: dict[str, int]) -> None:
    body = httpx.get(server.url + "/v1/models", timeout=10).json()
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {"pin", "small", "smollm2", "large", "huge", "broken"}
    assert by_id["pin"]["state"] == "resident" and by_id["small"]["state"] == "unloaded"
    assert by_id["smollm2"]["root"] == "small"
    for name, planned_bytes in planned.items():
        assert by_id[name]["planned_memory_mib"] == round(planned_bytes / MIB, 1)


def test_alternating_requests_are_all_answered_by_evicting(server: ServerProcess,
                                                           client: openai.OpenAI) -> None:
    answered = [_chat(client, model) for model in ("small", "large", "smollm2", "large")]
    assert answered == ["small", "large", "small", "large"]
    metric = _metric(server)
    assert metric("edgeserve_model_evictions_total", model="small", reason="lru") >= 2
    assert metric("edgeserve_model_evictions_total", model="large", reason="lru") >= 1
    assert metric("edgeserve_model_loads_total", model="large") >= 2
    assert metric("edgeserve_model_evictions_total", model="pin") == 0
    assert _states(server)["pin"] == "resident"


def test_concurrent_requests_across_an_eviction_are_none_lost(server: ServerProcess,
                                                              client: openai.OpenAI) -> None:
    models = ["small", "large"] * 3
    with ThreadPoolExecutor(len(models)) as pool:
        answered = list(pool.map(lambda m: _chat(client, m, max_tokens=8), models))
    assert answered == models
    assert _metric(server)("edgeserve_model_refusals_total") == 0


def test_embeddings_beside_a_chat_stream(server: ServerProcess, client: openai.OpenAI) -> None:
    _chat(client, "small")  # resident beside the pinned model
    vectors: list[list[float]] = []
    stream = client.chat.completions.create(model="small", max_tokens=24, stream=True,
                                            messages=[{"role": "user", "content": "Count to ten."}])
    chunks = iter(stream)
    first = next(chunks)  # the stream is running on "small"
    embedder = threading.Thread(target=lambda: vectors.extend(
        d.embedding for d in client.embeddings.create(model="pin", input=["one", "two"]).data))
    embedder.start()
    rest = list(chunks)
    embedder.join(120)
    assert first.model == "small" and rest[-1].choices[0].finish_reason is not None
    assert len(vectors) == 2 and len(vectors[0]) > 100
    assert _states(server)["small"] == "resident" and _states(server)["pin"] == "resident"


def test_a_resident_model_is_served_while_another_loads(server: ServerProcess, client: openai.OpenAI) -> None:
    _chat(client, "large")  # "small" must now evict it and load
    finished: list[str] = []
    loader = threading.Thread(target=lambda: finished.append(_chat(client, "small")))
    loader.start()
    deadline = 600
    while _states(server)["small"] == "unloaded" and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert _states(server)["small"] == "loading"  # a load takes seconds: the poll sees it
    client.embeddings.create(model="pin", input="served meanwhile")
    finished.append("pin")
    loader.join(120)
    # The pinned model answered first: its request never waited for the other model's load.
    assert finished == ["pin", "small"]


def test_a_model_that_cannot_fit_beside_a_pinned_one_gets_503_naming_it(server: ServerProcess,
                                                                        client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        _chat(client, "huge")
    err = info.value
    assert err.status_code == 503 and err.response.headers.get("retry-after")
    assert err.code == "model_does_not_fit"
    assert "pin (" in err.message and "pinned" in err.message
    assert _metric(server)("edgeserve_model_refusals_total", model="huge", reason="does_not_fit") == 1
    assert _states(server)["pin"] == "resident"


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, "gpt-4")
    assert info.value.code == "model_not_found" and "'small'" in info.value.message


def test_a_model_that_fails_to_load_is_a_503_and_the_others_still_serve(
        server: ServerProcess, client: openai.OpenAI, larger_variant: Path) -> None:
    larger_variant.with_name("goes-away.gguf").unlink()
    with pytest.raises(openai.APIStatusError) as info:
        _chat(client, "broken")
    assert info.value.status_code == 503 and info.value.code == "model_load_failed"
    assert _metric(server)("edgeserve_model_load_failures_total", model="broken") == 1
    assert _states(server)["broken"] == "unloaded"
    assert _chat(client, "small") == "small"


def test_an_idle_model_leaves_after_its_ttl(server: ServerProcess, client: openai.OpenAI) -> None:
    _chat(client, "large")
    assert _states(server)["large"] == "resident"
    deadline = IDLE_TTL_S * 10
    waited = 0.0
    while _states(server)["large"] != "unloaded" and waited < deadline:
        threading.Event().wait(0.5)
        waited += 0.5
    assert _states(server)["large"] == "unloaded"
    assert _metric(server)("edgeserve_model_evictions_total", model="large", reason="idle_ttl") >= 1
