"""The CPU-testable parts of bench/memory_accuracy.py: log and nvidia-smi parsing, commands, the dry run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory_accuracy.py"

SERVER_LOG = """
load_tensors: offloaded 33/33 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   281.81 MiB
load_tensors:        CUDA0 model buffer size =  4403.49 MiB
llama_context:  CUDA_Host  output buffer size =     0.98 MiB
llama_kv_cache:      CUDA0 KV buffer size =  1088.00 MiB
sched_reserve:      CUDA0 compute buffer size =   100.50 MiB
sched_reserve:  CUDA_Host compute buffer size =    40.01 MiB
sched_reserve:      CUDA0 compute buffer size =   104.25 MiB
"""


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("memory_accuracy", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["memory_accuracy"] = mod  # dataclasses look the module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_parse_buffer_log(bench: ModuleType) -> None:
    assert bench.parse_buffer_log(SERVER_LOG) == {"model": 4403.49, "KV": 1088.0, "compute": 104.25}


def test_parse_compute_apps(bench: ModuleType) -> None:
    text = "4242, 5873\n17, 100\nnot a row\n"
    assert bench.parse_compute_apps(text) == {4242: 5873.0, 17: 100.0}


def test_llama_server_command(bench: ModuleType) -> None:
    cfg = bench.Config("llama8b", 16384, 4, False, "f16")
    cmd = bench.llama_server_cmd("llama-server", Path("m.gguf"), cfg, 9000)
    joined = " ".join(cmd)
    assert "-ngl 99" in joined and "-c 16384" in joined and "-np 4" in joined and "-fa off" in joined
    assert "-ctk f16 -ctv f16" in joined and "--fit off" in joined and cmd[-1] == "9000"
    assert cfg.name == "llama8b c16k np4 nofa f16"


def test_configs_cover_the_required_grid(bench: ModuleType) -> None:
    args = bench.parse_args(["--dry-run"])
    configs = [c for c in bench.select_configs(args) if c.model == "llama8b"]
    assert len(configs) >= 8
    assert {c.kv_type for c in configs} == {"f16", "q8_0", "q4_0"}
    assert {c.flash_attn for c in configs} == {True, False}
    assert min(c.n_ctx_total for c in configs) == 4096 and max(c.n_ctx_total for c in configs) == 65536
    assert min(c.n_parallel for c in configs) == 1 and max(c.n_parallel for c in configs) == 16
    # a quantized V cache without flash attention cannot start in llama.cpp
    assert all(c.flash_attn for c in configs if c.kv_type != "f16")
    gemma = bench.select_configs(bench.parse_args(["--only", "gemma"]))
    assert [c.model for c in gemma] == ["gemma", "gemma"]


def test_dry_run_writes_table_and_json(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| llama8b c64k np16 fa q8_0 |" in table and "predicted MiB" in table
    data = json.loads((tmp_path / "memory_accuracy.json").read_text())
    assert data["card"] == "h100-80gb" and len(data["results"]) >= 13
    first = next(r for r in data["results"] if r["config"] == "llama8b c4k np1 fa f16")
    # Q4_K_M weights of Llama-3.1-8B without token_embd (it stays on the CPU): about 4.3 GiB
    assert 4300 < first["predicted"]["weights"] < 4500
    assert first["predicted"]["kv"] == 512.0


def test_render_table_reports_errors(bench: ModuleType) -> None:
    r = bench.Result(
        config="x",
        predicted_mib=1030.0,
        measured_idle_mib=1000.0,
        measured_loaded_mib=1010.0,
        error_idle_pct=3.0,
        error_loaded_pct=1.98,
    )
    failed = bench.Result(config="y", predicted_mib=10.0, error="TimeoutError: no /health 200 in time")
    text = bench.render_table([r, failed], "H100")
    assert "| x | 1,030 | 1,000 | 3.0 | 1,010 | 2.0 |" in text
    assert "failed: TimeoutError" in text and "within 3%: 2/2" in text
    assert bench.error_pct(103.0, 100.0) == 3.0 and bench.error_pct(1.0, None) is None


@pytest.mark.slow
def test_synthetic_gemma3_loads_in_llama_cpp(tmp_path: Path) -> None:
    """The Gemma-3-270M-shaped file is a model llama.cpp accepts, and reads back as the dry run's spec."""
    import ctypes

    import llama_cpp

    from quantize.bundled import smollm2_path
    from quantize.model.gguf_file import read_model_spec
    from quantize.synthetic_gemma3 import gemma3_like_spec, write_gemma3_like

    path = write_gemma3_like(tmp_path / "g3.gguf", smollm2_path())  # any tokenizer will do
    spec = read_model_spec(path)
    expected = gemma3_like_spec(49152)
    assert spec.model_dump(exclude={"path", "tensors", "has_chat_template"}) == expected.model_dump(
        exclude={"path", "tensors", "has_chat_template"}
    )
    assert [(t.name, t.n_bytes) for t in spec.tensors] == [(t.name, t.n_bytes) for t in expected.tensors]
    assert [il for il in range(18) if not spec.is_swa(il)] == [5, 11, 17]

    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user: ctypes.c_void_p) -> None:
        pass

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    try:
        model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params()
        )
        assert model, "llama.cpp rejected the synthetic gemma3 file"
        llama_cpp.llama_model_free(model)
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
