"""`auto` between the embedded engine and llama-server on a GPU, and llama-server's --backend-sampling, as the
measurements in backend_speed.yaml decide them; every choice says in the plan what it rests on."""

from __future__ import annotations

from server.hardware.cards import GpuSet, get_card
from server.launch.backend_speed import SpeedRecord, Verdict, backend_sampling_wins, engine_verdict, records
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.toolchain import Toolchain

# Everything installed, and a llama-cpp-python built with CUDA.
GPU_READY = Toolchain(python="python3", has_sglang=False, llama_server="/opt/llama/bin/llama-server",
                      edgeserve=("edgeserve",), cpu_threads=8, engine_gpu_offload=True)


def _record(ratios: dict[str, dict[int, float]]) -> SpeedRecord:
    return SpeedRecord(gpu="NVIDIA T", model="m", date="2026-01-01", slots=8,
                       over={"llama-server": ratios, "llama-server-bs": ratios})


def test_the_packaged_measurements_load() -> None:
    latest = max(records(), key=lambda r: r.date)
    assert latest.gpu == "NVIDIA H200"
    assert set(latest.over) == {"llama-server", "llama-server-bs"}
    assert {"greedy", "sampled", "sampled-full", "chat"} <= set(latest.over["llama-server-bs"])


def test_nearest_measured_stream_count_is_used() -> None:
    rec = _record({"greedy": {1: 2.0, 8: 1.5, 64: 0.5}})
    assert rec.at("llama-server", 1) == {"greedy": 2.0}
    assert rec.at("llama-server", 6) == {"greedy": 1.5}
    assert rec.at("llama-server", 48) == {"greedy": 0.5}


def test_a_verdict_names_the_shapes_where_llama_server_was_faster() -> None:
    rec = _record({"greedy": {8: 2.0}, "sampled": {8: 0.5}})
    verdict = Verdict(ratio=1.0, slower={"sampled": 0.5}, record=rec)
    assert verdict.engine_wins
    assert "sampled 0.50x" in verdict.why(8) and "NVIDIA T" in verdict.why(8)
    losing = Verdict(ratio=0.8, slower={"greedy": 0.8}, record=rec)
    assert not losing.engine_wins


def test_auto_picks_the_engine_where_it_measured_faster(plan_for) -> None:
    verdict = engine_verdict(8)
    assert verdict is not None and verdict.engine_wins  # what backend_speed.yaml says today
    plan = plan_for("rtx-4090", toolchain=GPU_READY, n_parallel=8)
    assert plan.backend == "embedded"
    reason = plan.reason("backend")
    assert reason is not None and reason.source == "derived"
    assert "NVIDIA H200" in reason.why and "llama-server --backend-sampling" in reason.why
    assert "slower on" in reason.why  # where llama-server was faster, the plan says so


def test_auto_picks_llama_server_when_the_engine_cannot_use_the_gpu(plan_for, full_toolchain) -> None:
    no_gpu_engine = full_toolchain.model_copy(update={"has_sglang": False, "engine_gpu_offload": False})
    plan = plan_for("rtx-4090", toolchain=no_gpu_engine)
    assert plan.backend == "llama-server"
    assert "no GPU support" in plan.reason("backend").why


def test_llama_server_on_a_gpu_samples_in_the_graph(plan_for) -> None:
    wins = backend_sampling_wins()
    assert wins is not None and wins[0] * 2 > wins[1]
    plan = plan_for("rtx-4090", backend="llama-server")
    assert plan.backend_sampling is True and "--backend-sampling" in plan.argv
    assert f"{wins[0]} of {wins[1]}" in plan.reason("backend_sampling").why


def test_llama_server_on_the_cpu_or_told_otherwise_samples_on_the_host(plan_for) -> None:
    cpu = plan_for("cpu", backend="llama-server")
    assert cpu.backend_sampling is None and "--backend-sampling" not in cpu.argv
    off = plan_for("rtx-4090", backend="llama-server", backend_sampling=False)
    assert off.backend_sampling is False and "--backend-sampling" not in off.argv
    assert off.reason("backend_sampling").source == "cli"


def test_an_engine_without_gpu_support_is_planned_for_the_cpu_and_says_so(full_toolchain) -> None:
    # This machine's GPU (detected: --card auto) with an engine whose llama.cpp has no GPU support.
    cpu_engine = full_toolchain.model_copy(update={"engine_gpu_offload": False})
    request = LaunchRequest(backend="embedded", card="auto")
    plan = make_plan(request, toolchain=cpu_engine, target=GpuSet.of(get_card("rtx-4090"), 1))
    assert plan.gpus == 0 and plan.n_gpu_layers == 0  # budgeted and run where it will really run
    why = plan.reason("backend").why
    assert "ON THE CPU" in why and "setup_env.sh" in why
