"""The start-up OOM ladder with a real backend on the CPU: `edgeserve serve` (the embedded llama.cpp engine)
asked for a context whose KV cache cannot be allocated steps its context down until it serves.

The backend runs under a memory cap (RLIMIT_DATA, the supervisor's `memory_limit_bytes`): allocations past it
fail at once the way a full GPU's cudaMalloc does, and nothing close to the machine's RAM is ever touched.
"""

from __future__ import annotations

import sys

import pytest

from loadtest.servers import free_port
from quantize.bundled import smollm2_path
from quantize.model.units import GIB
from server.hardware.target import CpuTarget
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.supervisor import Supervisor, SupervisorConfig
from server.launch.toolchain import Toolchain

CAP_BYTES = 3 * GIB
# 64 sequences of SmolLM2-135M's whole 8192-token training context (the engine caps n_ctx there): 512k tokens
# of f16 KV cache (30 layers x 3 KV heads x 128 x 2 bytes per token), ~11 GiB.
IMPOSSIBLE_CTX = 8192
N_PARALLEL = 64


@pytest.fixture
def edgeserve_cmd() -> tuple[str, ...]:
    try:
        import server.cli.app  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the edgeserve CLI does not import: {exc}")
    return (sys.executable, "-m", "server.cli.app")


@pytest.mark.slow
def test_ladder_steps_context_down_until_the_backend_serves(edgeserve_cmd: tuple[str, ...]) -> None:
    toolchain = Toolchain(python=sys.executable, edgeserve=edgeserve_cmd, cpu_threads=2)
    request = LaunchRequest(
        backend="embedded",
        card="cpu",
        model_path=str(smollm2_path()),
        n_ctx=IMPOSSIBLE_CTX,
        n_parallel=N_PARALLEL,
        port=free_port(),
    )
    plan = make_plan(request, toolchain=toolchain, target=CpuTarget(ram_bytes=16 * GIB))
    assert plan.n_ctx == IMPOSSIBLE_CTX
    assert plan.memory is not None and plan.memory.total_bytes > 3 * CAP_BYTES

    config = SupervisorConfig(
        memory_limit_bytes=CAP_BYTES,
        available_bytes=CAP_BYTES,
        health_interval_s=0.2,
        health_timeout_s=240,
        backoff_initial_s=0.1,
    )
    sup = Supervisor(plan, config)
    sup.start()
    try:
        assert sup.wait_ready(300), [f"{e.kind}: {e.detail}" for e in sup.events]
        steps = sup.steps
        assert steps, "the backend started without any step down"
        assert {s.rung for s in steps} == {"context"}
        assert steps[0].old == IMPOSSIBLE_CTX
        news = [s.new for s in steps]
        assert news == sorted(news, reverse=True) and news[-1] <= IMPOSSIBLE_CTX // 4
        exits = [e for e in sup.events if e.kind == "exit"]
        assert len(exits) == len(steps)
        assert all(e.failure["kind"] == "oom" for e in exits)  # type: ignore[index]
        assert sup.plan.n_ctx == news[-1]
        assert "--n-ctx" in sup.plan.argv and str(news[-1]) in sup.plan.argv
        assert sup.restarts == 0  # ladder steps are not crash restarts

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{plan.port}/v1", api_key="none", max_retries=0)
        reply = client.completions.create(model="edgeserve", prompt="Hello", max_tokens=4, temperature=0)
        assert reply.choices[0].text
    finally:
        sup.stop()
    assert sup.state == "stopped"
