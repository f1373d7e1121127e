"""The VRAM budget calculator: (GPUs or CPU, ModelSpec, level, backend, context settings) -> Budget.

Pure functions. `estimate` gives one Budget; `best_level` the highest-quality level that fits;
`level_table` the grid `edgeserve plan` prints. llama-server and the embedded engine share llama.cpp's
memory model (quantize.budget_llama); sglang uses SGLang's (quantize.budget_sglang). Figures are per GPU:
total_bytes is the memory the backend process holds on its fullest GPU as nvidia-smi reports it, CUDA
context included.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantize import budget_llama as bl
from quantize.budget_sglang import (
    SGLANG_KV_TYPES,
    SGLANG_METADATA_BYTES,
    SglangSettings,
    sglang_settings,
    weights_per_gpu,
)
from quantize.budget_types import (
    BACKENDS,
    Backend,
    Budget,
    CpuTarget,
    GpuBudget,
    LevelTable,
    TableRow,
)
from quantize.levels import LEVELS, QuantLevel, get_level, level_for_ftype
from quantize.model_spec import TOKEN_EMBD, ModelSpec
from quantize.tensor_types import spec_at_level
from server.cards import GpuSet

DEFAULT_HEADROOM_FRACTION = 0.05
DEFAULT_CONTEXTS = (2048, 4096, 8192, 16384, 32768)
MIB = 1 << 20

__all__ = [
    "BACKENDS",
    "DEFAULT_CONTEXTS",
    "DEFAULT_HEADROOM_FRACTION",
    "Backend",
    "Budget",
    "CpuTarget",
    "GpuBudget",
    "LevelTable",
    "TableRow",
    "best_level",
    "estimate",
    "level_table",
]


def _quant_name(spec: ModelSpec) -> str:
    lv = level_for_ftype(spec.file_type)
    return lv.name if lv else (spec.file_type_name or "unknown")


def _check_kv(backend: Backend, kv_type: str, flash_attn: bool) -> list[str]:
    if backend == "sglang":
        if kv_type not in SGLANG_KV_TYPES:
            return [f"SGLang takes --kv-cache-dtype {'|'.join(SGLANG_KV_TYPES)}, not {kv_type!r}"]
        return []
    if kv_type not in bl.LLAMA_KV_TYPES:
        return [f"llama.cpp KV type must be one of {', '.join(bl.LLAMA_KV_TYPES)}, got {kv_type!r}"]
    if bl.is_quantized(kv_type) and not flash_attn:
        return [
            f"a quantized V cache ({kv_type}) requires flash attention in llama.cpp; use --flash-attn or f16"
        ]
    return []


def estimate(
    target: GpuSet | CpuTarget,
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

    llama.cpp backends: n_ctx is -c, the total over n_parallel slots. swa_full/n_outputs_max default to each
    backend's own default (llama-server: false / n_parallel; llama_context_default_params: true / n_batch).
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
    target: GpuSet | CpuTarget, spec: ModelSpec, backend: Backend, n_ctx: int, n_parallel: int, kv: str,
    flash_attn: bool, n_batch: int, n_ubatch: int, kv_unified: bool, swa_full: bool | None,
    n_outputs_max: int | None, headroom_fraction: float, reasons: list[str], is_estimated: bool,
) -> Budget:
    is_cpu = isinstance(target, CpuTarget)
    n_dev = 1 if isinstance(target, CpuTarget) else target.count
    swa = swa_full if swa_full is not None else backend == "embedded"
    outputs = n_outputs_max if n_outputs_max is not None else (n_parallel if backend == "llama-server" else 0)
    sizes = bl.context_sizes(
        spec,
        n_ctx,
        n_parallel,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
        swa_full=swa,
        n_outputs_max=outputs,
    )
    kv_ok = not any("llama.cpp KV type" in r for r in reasons)
    notes: list[str] = []
    if spec.n_ctx_train and sizes.n_ctx_seq > spec.n_ctx_train:
        notes.append(f"{sizes.n_ctx_seq} tokens per slot exceed the trained context of {spec.n_ctx_train}")
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
        f"mem_fraction_static {s.mem_fraction_static} (SGLang's default here: "
        f"{s.sglang_default_mem_fraction}); KV pool {s.max_total_tokens} tokens"
    ]
    if s.max_total_tokens < n_ctx:
        reasons.append(f"the KV pool holds {s.max_total_tokens} tokens, fewer than the {n_ctx} asked for")
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
            fits=total <= memory * (1 - headroom_fraction) and s.max_total_tokens >= n_ctx,
        )
        for i in range(tp)
    )
    return _assemble(
        target, spec, "sglang", n_ctx, s.max_total_tokens, s.context_length, n_parallel, kv, True,
        s.chunked_prefill_size, s.chunked_prefill_size, False, list(per_gpu), memory, headroom_fraction,
        reasons, notes, is_estimated, host=0, sglang=s
    )  # fmt: skip
# fmt: on


# fmt: off
def _assemble(
    target: GpuSet | CpuTarget, spec: ModelSpec, backend: Backend, n_ctx: int, n_ctx_eff: int,
    n_ctx_seq: int, n_parallel: int, kv: str, flash_attn: bool, n_batch: int, n_ubatch: int,
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
    if isinstance(target, CpuTarget):
        card_id, card_name, n = "cpu", "CPU (system RAM)", 0
    else:
        card_id, card_name, n = target.card.id, target.card.name, target.count
    return Budget(
        card=card_id,
        card_name=card_name,
        gpus=n,
        backend=backend,
        model=spec.name,
        quant=_quant_name(spec),
        is_estimated_quant=is_estimated,
        n_ctx=n_ctx,
        n_ctx_effective=n_ctx_eff,
        n_ctx_per_seq=n_ctx_seq,
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
    target: GpuSet | CpuTarget, spec: ModelSpec, levels: Sequence[QuantLevel] = LEVELS, **kwargs: object
) -> tuple[QuantLevel, Budget] | None:
    """The highest-quality level whose budget fits (with headroom), and that budget; None if none fits."""
    for lv in sorted(levels, key=lambda x: -x.quality_rank):
        b = estimate(target, spec, lv, **kwargs)  # type: ignore[arg-type]
        if b.fits:
            return lv, b
    return None


def level_table(
    target: GpuSet | CpuTarget,
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
