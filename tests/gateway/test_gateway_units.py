"""Gateway parts that need no model: admission, schemas, settings, metrics, the command line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.gateway.admission import Admission, QueueFullError, QueueTimeoutError
from server.gateway.backends.base import (
    BackendStats,
)
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
