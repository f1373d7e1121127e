"""The OOM ladder (pure: plan + failure -> next plan) and recognising OOM in backend logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantize.model.units import GIB
from server.hardware.oom import Failure, classify
from server.launch.ladder import next_step
from server.launch.plan import LaunchPlan, QuantFile

OOM = Failure(kind="oom", phase="startup", cause="alloc", evidence="cudaMalloc failed: out of memory")


def _walk(plan: LaunchPlan, failure: Failure = OOM, limit: int = 50) -> list[LaunchPlan]:
    plans = [plan]
    while (nxt := next_step(plans[-1], failure)) is not None:
        plans.append(nxt)
        assert len(plans) < limit
    return plans


def _flag(plan: LaunchPlan, flag: str) -> str:
    return plan.argv[plan.argv.index(flag) + 1]


def test_llama_server_ladder_order(plan_for) -> None:
    plan = plan_for("tesla-p4", backend="llama-server", n_ctx=4096, n_parallel=4)
    plan = plan.model_copy(
        update={
            "quant_alternatives": (
                QuantFile(path="/m/model-Q3_K_M.gguf", quant="Q3_K_M", size_bytes=60 << 20),
                QuantFile(path="/m/model-Q2_K.gguf", quant="Q2_K", size_bytes=50 << 20),
            )
        }
    )
    plans = _walk(plan)
    rungs = [p.ladder[-1].rung for p in plans[1:]]
    # context 4096 -> 2048 -> 1024, parallel 4 -> 2 -> 1, KV q8_0 -> q4_0, two smaller files, layers, CPU
    assert rungs == [
        "context",
        "context",
        "parallel",
        "parallel",
        "kv_type",
        "quant",
        "quant",
        "gpu_layers",
        "gpu_layers",
        "gpu_layers",
        "cpu",
    ]
    by_rung = {p.ladder[-1].rung: p for p in plans[1:]}
    assert _flag(by_rung["context"], "-c") == str(by_rung["context"].n_ctx * 4)
    assert _flag(by_rung["kv_type"], "-ctk") == "q4_0" == _flag(by_rung["kv_type"], "-ctv")
    assert _flag(by_rung["quant"], "-m") in ("/m/model-Q3_K_M.gguf", "/m/model-Q2_K.gguf")
    last = plans[-1]
    assert last.n_gpu_layers == 0 and last.gpus == 0 and _flag(last, "-ngl") == "0"
    assert last.env == {"CUDA_VISIBLE_DEVICES": ""}  # GPUs hidden from the CPU-only process
    assert last.ladder[-1].step == len(plans) - 1
    assert {t.setting for t in last.ladder if t.rung == "cpu"} == {"n_gpu_layers", "gpus"}
    assert all(r.source == "derived" for r in last.reasons if r.why.startswith("OOM ladder"))
    # the estimate follows the steps down
    sizes = [p.expected_total_bytes for p in plans[:4]]
    assert sizes == sorted(sizes, reverse=True)


def test_sglang_ladder_has_no_layer_rungs(plan_for, sglang_parse) -> None:
    plan = plan_for("rtx-4090", backend="sglang", n_ctx=2048, n_parallel=2)
    plans = _walk(plan)
    rungs = [p.ladder[-1].rung for p in plans[1:]]
    assert rungs[:3] == ["context", "parallel", "mem_fraction"]
    assert rungs[-1] == "kv_type" and plans[-1].kv_type == "fp8_e4m3"
    assert plans[-2].mem_fraction == 0.5
    for p in plans:
        ns = sglang_parse(p)
        assert ns.mem_fraction_static == pytest.approx(p.mem_fraction, abs=5e-4)


def test_sglang_pool_too_small_raises_the_fraction(plan_for) -> None:
    plan = plan_for("rtx-3090", backend="sglang", mem_fraction=0.6)
    failure = Failure(kind="oom", phase="startup", cause="pool_too_small")
    nxt = next_step(plan, failure)
    assert nxt is not None and nxt.mem_fraction == pytest.approx(0.65)
    assert nxt.n_ctx == plan.n_ctx  # smaller requests would not help


def test_embedded_ladder_skips_what_the_engine_has_no_knob_for(plan_for) -> None:
    plan = plan_for("rtx-4090", backend="embedded", n_ctx=2048, n_parallel=2)
    rungs = {p.ladder[-1].rung for p in _walk(plan)[1:]}
    assert "mem_fraction" not in rungs
    assert {"context", "parallel", "gpu_layers", "cpu"} <= rungs


def test_a_measured_shortfall_jumps_instead_of_halving(plan_for) -> None:
    plan = plan_for("cpu", backend="embedded", n_ctx=1 << 20, n_parallel=1)
    failure = Failure(kind="oom", phase="startup", requested_bytes=100 * GIB, available_bytes=2 * GIB)
    nxt = next_step(plan, failure)
    assert nxt is not None
    assert nxt.n_ctx <= int((1 << 20) * 2 / 100 * 0.8) + 256
    assert "scale the context" in nxt.ladder[-1].why


def test_not_an_oom_is_not_the_ladders_business(plan_for) -> None:
    plan = plan_for("tesla-p4", backend="llama-server")
    assert next_step(plan, Failure(kind="crash", phase="startup", exit_code=-11)) is None
    assert next_step(plan, Failure(kind="load_error", phase="startup")) is None


# Log lines as the sources print them (format strings filled in).
@pytest.mark.parametrize(
    ("line", "size"),
    [
        (
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: "
            "cudaMalloc failed: out of memory",
            4096 << 20,
        ),
        ("ggml_aligned_malloc: insufficient memory (attempted to allocate 49152.00 MB)", 49152 << 20),
        (
            "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 51539607552",
            51539607552,
        ),
        ("ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 2147483648", 2147483648),
        (
            "llama_init_from_model: failed to initialize the context: failed to allocate buffer for kv cache",
            None,
        ),
        ("llama_model_load: error loading model: unable to allocate CUDA0 buffer", None),
        ("common_init_from_params: failed to create context with model 'm.gguf'", None),
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. "
            "GPU 0 has a total capacity of 79.19 GiB",
            2 << 30,
        ),
        (
            "model load failed: llama.cpp could not create a context for m.gguf (n_ctx=4194304)",
            None,
        ),
    ],
)
def test_oom_lines(line: str, size: int | None) -> None:
    failure = classify(["loading model", line, "exiting"], 1, phase="startup", available_bytes=GIB)
    assert failure.kind == "oom" and failure.cause == "alloc"
    assert failure.requested_bytes == size
    assert failure.available_bytes == GIB


def test_sglang_pool_message() -> None:
    line = "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static. Current value: 0.5"
    failure = classify([line], 1, phase="startup")
    assert failure.kind == "oom" and failure.cause == "pool_too_small"


def test_failed_load_without_allocation_is_a_load_error() -> None:
    lines = [
        "gguf_init_from_file: failed to open GGUF file 'x.gguf' (No such file or directory)",
        "srv load_model: failed to load model, 'x.gguf'",
    ]
    assert classify(lines, 1, phase="startup").kind == "load_error"
    with_alloc = [*lines, "unable to allocate CUDA0 buffer"]
    assert classify(with_alloc, 1, phase="startup").kind == "oom"


def test_anything_else_is_a_crash() -> None:
    failure = classify(["serving", "Segmentation fault", ""], -11, phase="running")
    assert failure.kind == "crash" and failure.evidence == "Segmentation fault" and failure.exit_code == -11


def test_smaller_quantizations_next_to_the_model_are_found(tmp_path: Path, plan_for) -> None:
    from quantize.synthetic import write_synthetic_gguf

    model = write_synthetic_gguf(tmp_path / "tiny-F16.gguf")
    (tmp_path / "tiny-Q8_0.gguf").write_bytes(b"\0" * 2000)
    (tmp_path / "tiny-Q4_K_M.gguf").write_bytes(b"\0" * 1000)
    (tmp_path / "other-Q4_0.gguf").write_bytes(b"\0" * 10)  # another model: not an alternative
    plan = plan_for("tesla-p4", backend="llama-server", model_path=str(model))
    assert [q.quant for q in plan.quant_alternatives] == ["Q8_0", "Q4_K_M"]
    nxt = plan
    for _ in range(20):  # walk to the quant rung
        nxt = next_step(nxt, OOM)  # type: ignore[assignment]
        assert nxt is not None
        if nxt.ladder[-1].rung == "quant":
            break
    assert nxt.model_path.endswith("tiny-Q8_0.gguf") and nxt.quant == "Q8_0"
    assert _flag(nxt, "-m") == nxt.model_path
    assert [q.quant for q in nxt.quant_alternatives] == ["Q4_K_M"]
