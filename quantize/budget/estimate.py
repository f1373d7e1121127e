"""The VRAM budget calculator: (GPUs or CPU, ModelSpec, level, backend, context settings) -> Budget.

Pure functions. `estimate` gives one Budget; `best_level` the highest-quality level that fits;
`level_table` the grid `edgeserve plan` prints. llama-server and the embedded engine share llama.cpp's
memory model (quantize.budget.llama); sglang uses SGLang's (quantize.budget.sglang). Figures are per GPU:
total_bytes is the memory the backend process holds on its fullest GPU as nvidia-smi reports it, CUDA
context included. `n_ctx` is the context of ONE sequence everywhere; the KV pool is n_ctx * n_parallel.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantize.budget import llama as bl
from quantize.budget.sglang import SGLANG_METADATA_BYTES, SglangSettings, sglang_settings, weights_per_gpu
from quantize.budget.types import BACKENDS, Backend, Budget, GpuBudget, LevelTable, TableRow
from quantize.model.kv_types import LLAMA_KV_TYPES, SGLANG_KV_TYPES, is_quantized_kv
from quantize.model.levels import LEVELS, QuantLevel, get_level, level_for_ftype
from quantize.model.spec import TOKEN_EMBD, ModelSpec
from quantize.model.tensor_types import spec_at_level
from quantize.model.units import MIB
from server.hardware.cards import GpuSet
from server.hardware.target import CpuTarget, Target

DEFAULT_HEADROOM_FRACTION = 0.05
DEFAULT_CONTEXTS = (2048, 4096, 8192, 16384, 32768)


def _quant_name(spec: ModelSpec) -> str:
    lv = level_for_ftype(spec.file_type)
    return lv.name if lv else (spec.file_type_name or "unknown")


def _check_kv(backend: Backend, kv_type: str, flash_attn: bool) -> list[str]:
    if backend == "sglang":
        if kv_type not in SGLANG_KV_TYPES:
            return [f"SGLang takes --kv-cache-dtype {'|'.join(SGLANG_KV_TYPES)}, not {kv_type!r}"]
        return []
    if kv_type not in LLAMA_KV_TYPES:
        return [f"llama.cpp KV type must be one of {', '.join(LLAMA_KV_TYPES)}, got {kv_type!r}"]
    if is_quantized_kv(kv_type) and not flash_attn:
        return [
            f"a quantized V cache ({kv_type}) requires flash attention in llama.cpp; use --flash-attn or f16"
        ]
    return []


def estimate(
    target: Target,
    spec: ModelSpec,
    level: str | QuantLevel | None = None,
    *,
    backend: Backend = "llama-server",
    n_ctx: int = 4096,
    n_parallel: int = 1,
    kv_type: str | None = None,
    flash_attn: bool = True,
    n_batch: int = 2048,
    n_ubatch: int = 512,
    kv_unified: bool = False,
    swa_full: bool | None = None,
    n_outputs_max: int | None = None,
    mem_fraction: float | None = None,
    headroom_fraction: float = DEFAULT_HEADROOM_FRACTION,
) -> Budget:
    """Memory of serving `spec` (at `level`, else as the file is) with these settings on `target`.

    `n_ctx` is the context of one of `n_parallel` sequences (llama-server's -c is their product).
    swa_full/n_outputs_max default to each backend's own default (llama-server: false / n_parallel;
    llama_context_default_params: true / n_batch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if n_ctx <= 0 or n_parallel <= 0:
        raise ValueError(f"n_ctx and n_parallel must be positive, got {n_ctx} and {n_parallel}")
    kv = kv_type or ("auto" if backend == "sglang" else "f16")
    is_estimated = False
    if level is not None:
        lv = get_level(level)
        if spec.file_type != lv.llama_ftype:
            spec = spec_at_level(spec, lv)
            is_estimated = True
    reasons = _check_kv(backend, kv, flash_attn)
    if isinstance(target, CpuTarget):
        if backend == "sglang":
            raise ValueError("SGLang needs an NVIDIA GPU (SM80+); the CPU runs llama.cpp backends only")
    elif backend == "sglang":
        if not target.card.can_run_sglang:
            major, minor = target.card.compute_capability
            raise ValueError(
                f"SGLang cannot run on {target.card.name} (compute capability {major}.{minor}; "
                "SGLang needs SM80+): use --backend llama-server or embedded"
            )
        if kv.startswith("fp8") and not target.card.can_fp8_kv:
            reasons.append(f"FP8 KV cache needs hardware FP8 (SM89+); {target.card.name} lacks it")
        return _sglang(
            target, spec, n_ctx, n_parallel, kv, mem_fraction, headroom_fraction, reasons, is_estimated
        )  # fmt: skip
    elif flash_attn and not target.card.has_flash_attn_kernels:
        reasons.append(f"llama.cpp has no flash-attention kernels for {target.card.name}")
    return _llama(
        target, spec, backend, n_ctx, n_parallel, kv, flash_attn, n_batch, n_ubatch, kv_unified,
        swa_full, n_outputs_max, headroom_fraction, reasons, is_estimated
    )  # fmt: skip


# fmt: off
def _llama(
    target: Target, spec: ModelSpec, backend: Backend, n_ctx: int, n_parallel: int, kv: str,
    flash_attn: bool, n_batch: int, n_ubatch: int, kv_unified: bool, swa_full: bool | None,
    n_outputs_max: int | None, headroom_fraction: float, reasons: list[str], is_estimated: bool,
) -> Budget:
    is_cpu = isinstance(target, CpuTarget)
    n_dev = 1 if isinstance(target, CpuTarget) else target.count
    swa = swa_full if swa_full is not None else backend == "embedded"
    outputs = n_outputs_max if n_outputs_max is not None else (n_parallel if backend == "llama-server" else 0)
    sizes = bl.context_sizes(
        spec,
        n_ctx * n_parallel,
        n_parallel,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
        swa_full=swa,
        n_outputs_max=outputs,
    )
    kv_ok = not any("llama.cpp KV type" in r for r in reasons)
    notes: list[str] = []
    if spec.n_ctx_train and n_ctx > spec.n_ctx_train:
        notes.append(f"{n_ctx} tokens per sequence exceed the trained context of {spec.n_ctx_train}")
    if spec.has_swa:
        notes.append(
            f"sliding window {spec.sliding_window}: {sum(spec.swa_layers)} of {spec.n_layer} layers keep "
            f"{sizes.swa_cells} cells per stream" + (" (swa_full)" if swa else "")
        )
    memory = target.ram_bytes if isinstance(target, CpuTarget) else target.memory_bytes_per_gpu
    card = None if isinstance(target, CpuTarget) else target.card
    overhead = (
        bl.CPU_OVERHEAD_BYTES
        if card is None
        else bl.cuda_overhead_bytes(card.sm_count, card.compute_capability)
    )
    embd_bytes = sum(t.n_bytes for t in spec.tensors if t.name == TOKEN_EMBD)
    logits_host = bl.output_buffer_bytes(spec, sizes, outputs)
    per_gpu: list[GpuBudget] = []
    for share in bl.device_shares(
        spec, sizes, n_dev, kv, flash_attn=flash_attn, is_cuda=not is_cpu, kv_ok=kv_ok
    ):
        # on the CPU one process holds it all: the mmapped file (token_embd included) and the logits buffer
        weights = spec.weights_bytes if is_cpu else share.weights_bytes
        comp = share.compute_bytes + (logits_host if is_cpu else 0)
        total = weights + share.kv_bytes + comp + overhead
        per_gpu.append(
            GpuBudget(
                index=share.index,
                layers=share.layers,
                has_output=share.has_output,
                weights_bytes=weights,
                kv_bytes=share.kv_bytes,
                compute_bytes=comp,
                overhead_bytes=overhead,
                total_bytes=total,
                memory_bytes=memory,
                headroom_bytes=memory - total,
                fits=total <= memory * (1 - headroom_fraction),
            )
        )
    if n_dev > 1:
        notes.append(
            f"layer split over {n_dev} GPUs with pipeline parallelism "
            f"({bl.SCHED_MAX_COPIES} copies of graph inputs)"
        )
    return _assemble(
        target, spec, backend, n_ctx, sizes.n_ctx, sizes.n_ctx_seq, n_parallel, kv, flash_attn,
        sizes.n_batch, sizes.n_ubatch, kv_unified, per_gpu, memory, headroom_fraction, reasons, notes,
        is_estimated, host=0 if is_cpu else embd_bytes + logits_host, sglang=None
    )  # fmt: skip
# fmt: on


# fmt: off
def _sglang(
    target: GpuSet, spec: ModelSpec, n_ctx: int, n_parallel: int, kv: str, mem_fraction: float | None,
    headroom_fraction: float, reasons: list[str], is_estimated: bool,
) -> Budget:
    memory = target.memory_bytes_per_gpu
    tp = target.count
    if max(spec.n_head_kv) % tp and tp % max(spec.n_head_kv):
        reasons.append(f"{max(spec.n_head_kv)} KV heads do not split over TP {tp}")
    s = sglang_settings(
        memory,
        spec,
        tp=tp,
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        kv_type=kv,
        mem_fraction=mem_fraction,
        headroom_fraction=headroom_fraction,
    )
    weights = weights_per_gpu(spec, tp)
    # CUDA/torch context (+ NCCL) before start-up, plus SGLang's constant metadata; the rest of its reserve is
    # activations and CUDA graphs.
    overhead = memory - s.free_at_start_bytes + SGLANG_METADATA_BYTES
    compute = s.reserved_bytes - SGLANG_METADATA_BYTES
    total = weights + s.kv_pool_bytes + compute + overhead
    notes = [
        f"mem_fraction {s.mem_fraction} (SGLang's default here: "
        f"{s.sglang_default_mem_fraction}); KV pool {s.kv_pool_tokens} tokens"
    ]
    if s.kv_pool_tokens < n_ctx * n_parallel:
        reasons.append(
            f"the KV pool holds {s.kv_pool_tokens} tokens, fewer than the {n_ctx * n_parallel} asked for"
        )
    if spec.has_swa:
        notes.append("SWA layers counted with a full cache (SGLang's hybrid SWA pool is not modelled)")
    per_gpu = tuple(
        GpuBudget(
            index=i,
            weights_bytes=weights,
            kv_bytes=s.kv_pool_bytes,
            compute_bytes=compute,
            overhead_bytes=overhead,
            total_bytes=total,
            memory_bytes=memory,
            headroom_bytes=memory - total,
            fits=total <= memory * (1 - headroom_fraction) and s.kv_pool_tokens >= n_ctx * n_parallel,
        )
        for i in range(tp)
    )
    return _assemble(
        target, spec, "sglang", n_ctx, s.kv_pool_tokens, s.n_ctx, n_parallel, kv, True,
        s.chunked_prefill_size, s.chunked_prefill_size, False, list(per_gpu), memory, headroom_fraction,
        reasons, notes, is_estimated, host=0, sglang=s
    )  # fmt: skip
# fmt: on


# fmt: off
def _assemble(
    target: Target, spec: ModelSpec, backend: Backend, n_ctx: int, kv_cells: int,
    kv_cells_per_stream: int, n_parallel: int, kv: str, flash_attn: bool, n_batch: int, n_ubatch: int,
    kv_unified: bool, per_gpu: list[GpuBudget], memory: int, headroom_fraction: float, reasons: list[str],
    notes: list[str], is_estimated: bool, *, host: int, sglang: SglangSettings | None,
) -> Budget:
    worst = max(per_gpu, key=lambda g: g.total_bytes)
    invalid = any(
        "requires flash attention" in r or "KV type" in r or "kv-cache-dtype" in r or "FP8 KV" in r
        for r in reasons
    )
    fits = all(g.fits for g in per_gpu) and not invalid and not any("KV pool holds" in r for r in reasons)
    if not fits and not reasons:
        reasons = [
            *reasons,
            f"needs {worst.total_bytes / MIB:,.0f} MiB on a device; "
            f"{memory * (1 - headroom_fraction) / MIB:,.0f} MiB usable",
        ]
    card_name = "CPU (system RAM)" if isinstance(target, CpuTarget) else target.card.name
    return Budget(
        card=target.card_id,
        card_name=card_name,
        gpus=target.count,
        backend=backend,
        model=spec.name,
        quant=_quant_name(spec),
        is_estimated_quant=is_estimated,
        n_ctx=n_ctx,
        n_ctx_total=n_ctx * n_parallel,
        kv_cells=kv_cells,
        kv_cells_per_stream=kv_cells_per_stream,
        n_parallel=n_parallel,
        kv_type=kv,
        flash_attn=flash_attn,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
        weights_bytes=worst.weights_bytes,
        kv_bytes=worst.kv_bytes,
        compute_bytes=worst.compute_bytes,
        overhead_bytes=worst.overhead_bytes,
        total_bytes=worst.total_bytes,
        memory_bytes=memory,
        usable_bytes=int(memory * (1 - headroom_fraction)),
        headroom_fraction=headroom_fraction,
        headroom_bytes=memory - worst.total_bytes,
        fits=fits,
        is_valid=not invalid,
        host_bytes=host,
        per_gpu=tuple(per_gpu),
        sglang=sglang,
        reasons=tuple(reasons),
        notes=tuple(notes),
    )
# fmt: on


def best_level(
    target: Target, spec: ModelSpec, levels: Sequence[QuantLevel] = LEVELS, **kwargs: object
) -> tuple[QuantLevel, Budget] | None:
    """The highest-quality level whose budget fits (with headroom), and that budget; None if none fits."""
    for lv in sorted(levels, key=lambda x: -x.quality_rank):
        b = estimate(target, spec, lv, **kwargs)  # type: ignore[arg-type]
        if b.fits:
            return lv, b
    return None


def level_table(
    target: Target,
    spec: ModelSpec,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    levels: Sequence[QuantLevel] = LEVELS,
    **kwargs: object,
) -> LevelTable:
    ordered = sorted(levels, key=lambda x: -x.quality_rank)
    rows = []
    grid: list[list[bool]] = []
    for lv in ordered:
        lspec = spec if spec.file_type == lv.llama_ftype else spec_at_level(spec, lv)
        cells = []
        for c in contexts:
            b = estimate(target, lspec, None, n_ctx=c, **kwargs)  # type: ignore[arg-type]
            cells.append((c, b.total_bytes, b.fits))
        rows.append(TableRow(level=lv.name, weights_bytes=lspec.weights_bytes, cells=tuple(cells)))
        grid.append([f for _, _, f in cells])
    best = tuple(
        next((ordered[i].name for i in range(len(ordered)) if grid[i][j]), None) for j in range(len(contexts))
    )
    return LevelTable(contexts=tuple(contexts), rows=tuple(rows), best=best)
