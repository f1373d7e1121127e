"""The VRAM budget calculator: exact KV figures, llama.cpp's own buffer sizes on the CPU, cards, backends."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from quantize.budget import best_level, estimate, level_table
from quantize.budget import llama as bl
from quantize.budget.sglang import (
    kv_cell_bytes,
    prefill_graph_sizes,
    sglang_default_fraction,
    sglang_settings,
)
from quantize.bundled import smollm2_path
from quantize.model.spec import ModelSpec
from quantize.model.units import GIB, MIB
from server.hardware.cards import GpuSet, get_card
from server.hardware.target import CpuTarget


def gemma_like() -> ModelSpec:
    """Gemma 3 270M shapes: 18 layers, 1 KV head of 256, a 512-token window on 15 layers."""
    return ModelSpec(
        architecture="gemma3",
        name="gemma-like",
        n_layer=18,
        n_embd=640,
        n_head=4,
        n_head_kv=(1,) * 18,
        head_dim_k=256,
        head_dim_v=256,
        n_ff=2048,
        n_vocab=262144,
        n_ctx_train=32768,
        sliding_window=512,
        swa_layers=tuple(il % 6 < 5 for il in range(18)),
    )


def p4() -> GpuSet:
    return GpuSet.of(get_card("tesla-p4"))


def test_kv_exact_numbers(smollm2: ModelSpec) -> None:
    cpu = CpuTarget(ram_bytes=8 * GIB)
    # 4096 cells * 30 layers * 3 KV heads * (64 * 2 + 64 * 2) bytes
    b = estimate(cpu, smollm2, n_ctx=4096, kv_type="f16")
    assert b.kv_bytes == 4096 * 30 * 3 * (64 * 2 + 64 * 2) == 94_371_840
    assert bl.kv_bytes_formula(smollm2, 4096, 2, 2) == b.kv_bytes
    assert estimate(p4(), smollm2, n_ctx=4096, kv_type="f16").kv_bytes == b.kv_bytes
    # q8_0 = 34 bytes per 32 values; 2 sequences of 2048 (-c 4096) are 2 streams of 2048
    b = estimate(cpu, smollm2, n_ctx=2048, n_parallel=2, kv_type="q8_0")
    assert b.kv_bytes == 4096 * 30 * 2 * (192 // 32 * 34) == 50_135_040
    assert b.kv_cells_per_stream == 2048 and b.n_ctx_total == 4096
    q4 = estimate(cpu, smollm2, n_ctx=4096, kv_type="q4_0")
    assert q4.kv_bytes == 4096 * 30 * 2 * (192 // 32 * 18)
    # CUDA adds a row of 512 - 192 values once per quantized tensor (MATRIX_ROW_PADDING) and aligns to 128
    gpu = estimate(p4(), smollm2, n_ctx=4096, kv_type="q4_0")
    per_tensor = q4.kv_bytes // 60 + 320 // 32 * 18
    assert gpu.kv_bytes == 60 * ((per_tensor + 127) // 128 * 128)


def test_context_padding_like_llama_cpp(smollm2: ModelSpec) -> None:
    b = estimate(p4(), smollm2, n_ctx=1000, n_parallel=3)
    # -c 3000 -> 3072, / 3 = 1024 per stream (already a multiple of 256)
    assert (b.kv_cells, b.kv_cells_per_stream) == (3072, 1024)
    b = estimate(p4(), smollm2, n_ctx=1365, n_parallel=3)
    # -c 4095 -> 4096, / 3 = 1365 -> 1536 per stream, n_ctx becomes 4608
    assert (b.kv_cells, b.kv_cells_per_stream) == (4608, 1536)
    unified = estimate(p4(), smollm2, n_ctx=1365, n_parallel=3, kv_unified=True)
    assert (unified.kv_cells, unified.kv_cells_per_stream) == (4096, 4096)


def test_quantized_v_without_flash_attention_is_rejected(smollm2: ModelSpec) -> None:
    b = estimate(p4(), smollm2, n_ctx=4096, kv_type="q8_0", flash_attn=False)
    assert not b.is_valid and not b.fits
    assert any("flash attention" in r for r in b.reasons)
    ok = estimate(p4(), smollm2, n_ctx=4096, kv_type="f16", flash_attn=False)
    assert ok.is_valid and ok.fits


def test_no_flash_attention_costs_the_kq_matrix(llama8b: ModelSpec) -> None:
    fa = estimate(GpuSet.of(get_card("h100-80gb")), llama8b, "Q4_K_M", n_ctx=32768, flash_attn=True)
    no_fa = estimate(GpuSet.of(get_card("h100-80gb")), llama8b, "Q4_K_M", n_ctx=32768, flash_attn=False)
    # KQ f32 [n_kv, n_ubatch, n_head] = 32768 * 512 * 32 * 4 bytes = 2 GiB
    assert no_fa.compute_bytes > 2 * GIB > 8 * fa.compute_bytes
    assert no_fa.kv_bytes == fa.kv_bytes == 32768 * 32 * 8 * 128 * 2 * 2


def test_sliding_window_layers_hold_only_the_window() -> None:
    g = gemma_like()
    b = estimate(p4(), g, n_ctx=32768, kv_type="f16", backend="llama-server")
    cell = 256 * 2 * 2  # one KV head of 256, K and V, f16
    swa_cells = 1024  # PAD(min(32768, 512 + 512), 256)
    assert b.kv_bytes == 3 * 32768 * cell + 15 * swa_cells * cell
    # llama_context_default_params has swa_full = true: the embedded engine keeps full caches unless told
    full = estimate(p4(), g, n_ctx=32768, kv_type="f16", backend="embedded")
    assert full.kv_bytes == 18 * 32768 * cell
    # with 4 slots (of 8192 tokens: the same 32768 cells) each stream has its own window
    b4 = estimate(p4(), g, n_ctx=8192, n_parallel=4, kv_type="f16")
    assert b4.kv_bytes == 3 * 32768 * cell + 15 * 4 * 1024 * cell


def test_layer_split_over_two_gpus(llama8b: ModelSpec) -> None:
    assert bl.layer_devices(32, 2) == [0] * 17 + [1] * 16  # layers 0-16, 17-31 and the output on GPU 1
    pair = GpuSet.of(get_card("rtx-5090"), count=2)
    one = GpuSet.of(get_card("rtx-5090"))
    b2 = estimate(pair, llama8b, "Q8_0", n_ctx=16384)
    b1 = estimate(one, llama8b, "Q8_0", n_ctx=16384)
    assert b2.gpus == 2 and len(b2.per_gpu) == 2
    assert b2.per_gpu[0].layers == (0, 16) and b2.per_gpu[1].layers == (17, 31)
    assert b2.per_gpu[1].has_output and not b2.per_gpu[0].has_output
    assert sum(g.kv_bytes for g in b2.per_gpu) == b1.kv_bytes
    assert b2.total_bytes < b1.total_bytes


def test_best_level_depends_on_the_card(llama8b: ModelSpec) -> None:
    kw = dict(n_ctx=8192, n_parallel=1)
    small = best_level(p4(), llama8b, **kw)
    big = best_level(GpuSet.of(get_card("rtx-5090")), llama8b, **kw)
    assert small is not None and big is not None
    assert big[0].quality_rank > small[0].quality_rank
    assert big[0].name == "F16"  # 16 GB of weights fit a 32 GB card
    assert small[1].fits and small[1].total_bytes <= small[1].usable_bytes
    # nothing fits a P4 at 128k context with 16 slots of f16 KV
    assert best_level(p4(), llama8b, n_ctx=131072, n_parallel=16) is None


def test_level_table_marks_best_per_context(llama8b: ModelSpec) -> None:
    t = level_table(p4(), llama8b, contexts=(2048, 32768))
    assert t.rows[0].level == "F16" and len(t.rows[0].cells) == 2
    assert t.best[0] is not None
    by_name = [r.level for r in t.rows]
    assert t.best[1] is None or by_name.index(t.best[1]) >= by_name.index(t.best[0])


def test_sglang_refused_where_it_cannot_run(llama8b: ModelSpec) -> None:
    for card in ("tesla-p4", "tesla-t4"):
        with pytest.raises(ValueError, match="SGLang cannot run"):
            estimate(GpuSet.of(get_card(card)), llama8b, backend="sglang")
    with pytest.raises(ValueError, match="SGLang needs an NVIDIA GPU"):
        estimate(CpuTarget(ram_bytes=64 * GIB), llama8b, backend="sglang")


def test_sglang_pool_and_settings(llama8b: ModelSpec) -> None:
    pair = GpuSet.of(get_card("rtx-5090"), count=2)
    b = estimate(pair, llama8b, backend="sglang", n_ctx=4096, n_parallel=8)
    s = b.sglang
    assert s is not None and s.tp_size == 2 and len(b.per_gpu) == 2
    # 8 KV heads over TP 2: 4 per GPU * 128 * (K + V) * 32 layers * 2 bytes
    assert s.kv_cell_bytes == kv_cell_bytes(llama8b, 2, "auto") == 4 * 128 * 2 * 32 * 2
    assert s.n_ctx == 4096 and s.n_parallel == 8 and b.n_ctx_total == 32768
    assert s.kv_pool_tokens * s.kv_cell_bytes == s.kv_pool_bytes == b.kv_bytes
    assert s.mem_fraction <= s.sglang_default_mem_fraction < 1
    assert b.fits and b.total_bytes <= b.usable_bytes
    # weights + pool fill the fraction of what was free at start-up
    assert b.weights_bytes + b.kv_bytes <= s.free_at_start_bytes * s.mem_fraction
    fp8 = sglang_settings(
        pair.memory_bytes_per_gpu, llama8b, tp=2, n_ctx=4096, n_parallel=8, kv_type="fp8_e4m3"
    )
    assert fp8.kv_pool_tokens == pytest.approx(2 * s.kv_pool_tokens, rel=0.01)


def test_sglang_default_fraction_formula() -> None:
    # 80 GiB: 512 + 8192*1.5 + 128 + 256*2 + 58 prefill graphs * 8 MiB (above the 10 GiB floor)
    assert sglang_default_fraction(80 * GIB, 1) == round((81920 - (512 + 12288 + 128 + 512 + 464)) / 81920, 3)
    # a 24 GiB card: 512 + 4096*1.5 + 128 + 48*2 + 50*8 MiB
    assert sglang_default_fraction(24 * GIB, 1) == round((24576 - (512 + 6144 + 128 + 96 + 400)) / 24576, 3)


def test_prefill_graph_sizes_match_sglang() -> None:
    hook = pytest.importorskip(
        "sglang.srt.arg_groups.cuda_graph_hook", reason="sglang's cuda_graph_hook does not import here"
    )
    for max_bs in (2048, 4096, 8192, 16384):
        assert prefill_graph_sizes(max_bs) == hook.generate_prefill_cuda_graph_batch_sizes(max_bs)


def test_cpu_target_budgets_against_ram(smollm2: ModelSpec) -> None:
    b = estimate(CpuTarget(ram_bytes=2 * GIB), smollm2, n_ctx=4096)
    assert b.card == "cpu" and b.gpus == 0 and b.fits
    assert b.weights_bytes == smollm2.weights_bytes  # token_embd included: it all lives in RAM
    tiny = estimate(CpuTarget(ram_bytes=128 * MIB), smollm2, n_ctx=4096)
    assert not tiny.fits and tiny.reasons


# ---- against llama.cpp itself (CPU backend, the real allocator)
# -----------------------------------------------

_BUF = re.compile(r"(KV|compute) buffer size =\s+([0-9.]+) MiB")


@pytest.fixture(scope="module")
def llama_model() -> Iterator[object]:
    logs: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user: ctypes.c_void_p) -> None:
        logs.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    model = llama_cpp.llama_model_load_from_file(
        str(smollm2_path()).encode(), llama_cpp.llama_model_default_params()
    )
    assert model
    try:
        yield model, logs
    finally:
        llama_cpp.llama_model_free(model)
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _llama_buffers(
    llama_model: object, n_ctx: int, n_seq: int, fa: bool, kv: str, n_outputs_max: int
) -> dict[str, float]:
    model, logs = llama_model  # type: ignore[misc]
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max, cp.n_outputs_max = n_ctx, n_seq, n_outputs_max
    cp.flash_attn_type = 1 if fa else 0
    cp.type_k = cp.type_v = {"f16": 1, "q8_0": 8}[kv]
    logs.clear()
    ctx = llama_cpp.llama_init_from_model(model, cp)
    assert ctx
    llama_cpp.llama_free(ctx)
    out: dict[str, float] = {}
    for line in logs:
        m = _BUF.search(line)
        if m and m.group(1) not in out:
            out[m.group(1)] = float(m.group(2))
    return out


# n_ctx_total is llama.cpp's cparams.n_ctx (-c); the budget takes one sequence's n_ctx = n_ctx_total / n_seq.
@pytest.mark.parametrize(
    ("n_ctx_total", "n_seq", "fa", "kv", "backend"),
    [
        (4096, 1, True, "f16", "embedded"),
        (8192, 4, True, "q8_0", "llama-server"),
        (3000, 3, False, "f16", "embedded"),
    ],
)
def test_kv_and_compute_match_llama_cpp(
    smollm2: ModelSpec, llama_model: object, n_ctx_total: int, n_seq: int, fa: bool, kv: str, backend: str
) -> None:
    n_out = n_seq if backend == "llama-server" else 0
    real = _llama_buffers(llama_model, n_ctx_total, n_seq, fa, kv, n_out)
    b = estimate(
        CpuTarget(ram_bytes=8 * GIB),
        smollm2,
        n_ctx=n_ctx_total // n_seq,
        n_parallel=n_seq,
        kv_type=kv,
        flash_attn=fa,
        backend=backend,
    )  # type: ignore[arg-type]
    assert b.kv_bytes / MIB == pytest.approx(real["KV"], abs=0.01)
    sizes = bl.context_sizes(
        smollm2,
        n_ctx_total,
        n_seq,
        n_batch=2048,
        n_ubatch=512,
        kv_unified=False,
        swa_full=True,
        n_outputs_max=n_out,
    )
    comp = bl.compute_bytes(
        smollm2, sizes, list(range(30)), has_output=True, type_k=kv, type_v=kv, flash_attn=fa, is_cuda=False
    )
    # the graph allocator's fragmentation is not modelled: a few MiB on small graphs
    assert comp / MIB == pytest.approx(real["compute"], rel=0.12)


def test_model_not_on_disk_is_estimated(smollm2: ModelSpec, tmp_path: Path) -> None:
    b = estimate(p4(), smollm2, "Q8_0", n_ctx=2048)
    assert b.quant == "Q8_0" and b.is_estimated_quant
    same = estimate(p4(), smollm2, "Q4_1" if False else None, n_ctx=2048)
    assert same.quant == "Q4_1" and not same.is_estimated_quant
