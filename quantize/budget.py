"""The VRAM budget calculator: (GPUs or CPU, ModelSpec, level, backend, context settings) -> Budget.

Pure functions. `estimate` gives one Budget; `best_level` the highest-quality level that fits;
`level_table` the grid `edgeserve plan` prints. llama-server and the embedded engine share llama.cpp's
memory model (quantize.budget_llama); sglang uses SGLang's (quantize.budget_sglang). Figures are per GPU:
total_bytes is the memory the backend process holds on its fullest GPU as nvidia-smi reports it, CUDA
context included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantize import budget_llama as bl
from quantize.budget_sglang import (
    SGLANG_KV_TYPES,
    SGLANG_METADATA_BYTES,
    SglangSettings,
    sglang_settings,
    weights_per_gpu,
)
from quantize.levels import LEVELS, QuantLevel, get_level, level_for_ftype, spec_at_level
from quantize.model_spec import TOKEN_EMBD, ModelSpec
from server.cards import GpuSet

Backend = Literal["llama-server", "embedded", "sglang"]
BACKENDS: tuple[Backend, ...] = ("llama-server", "embedded", "sglang")
DEFAULT_HEADROOM_FRACTION = 0.05
DEFAULT_CONTEXTS = (2048, 4096, 8192, 16384, 32768)
MIB = 1 << 20


class CpuTarget(BaseModel):
    """No GPU: the model runs from system RAM."""

    model_config = ConfigDict(frozen=True)

    ram_bytes: int = Field(gt=0)
    label: str = "cpu"


class GpuBudget(BaseModel):
    """One device's share."""

    model_config = ConfigDict(frozen=True)

    index: int
    layers: tuple[int, ...] = Field(default=(), description="first and last repeating layer on this device")
    has_output: bool = True
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    total_bytes: int
    memory_bytes: int
    headroom_bytes: int
    fits: bool


class Budget(BaseModel):
    """Memory of one deployment. The top-level byte figures are those of the fullest device."""

    model_config = ConfigDict(frozen=True)

    card: str
    card_name: str
    gpus: int
    backend: Backend
    model: str
    quant: str
    is_estimated_quant: bool = Field(
        description="True when the weights are estimated for a level not on disk"
    )
    n_ctx: int = Field(description="requested total context (llama.cpp -c, over all slots)")
    n_ctx_effective: int = Field(description="cells after llama.cpp's padding / SGLang's pool tokens")
    n_ctx_per_seq: int
    n_parallel: int
    kv_type: str
    flash_attn: bool
    n_batch: int
    n_ubatch: int
    kv_unified: bool
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    total_bytes: int
    memory_bytes: int = Field(description="memory of one device (RAM for the CPU)")
    usable_bytes: int = Field(description="memory * (1 - headroom_fraction)")
    headroom_fraction: float
    headroom_bytes: int = Field(description="memory - total (negative: does not fit at all)")
    fits: bool
    is_valid: bool = Field(description="False when the settings cannot start (e.g. quantized V without FA)")
    host_bytes: int = Field(description="host memory besides the GPU: token_embd, logits buffer")
    per_gpu: tuple[GpuBudget, ...] = ()
    sglang: SglangSettings | None = None
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


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
        return _llama(
            target,
            spec,
            backend,
            n_ctx,
            n_parallel,
            kv,
            flash_attn,
            n_batch,
            n_ubatch,
            kv_unified,
            swa_full,
            n_outputs_max,
            headroom_fraction,
            reasons,
            is_estimated,
        )
    if backend == "sglang":
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
        )
    if flash_attn and not target.card.has_flash_attn_kernels:
        reasons.append(f"llama.cpp has no flash-attention kernels for {target.card.name}")
    return _llama(
        target,
        spec,
        backend,
        n_ctx,
        n_parallel,
        kv,
        flash_attn,
        n_batch,
        n_ubatch,
        kv_unified,
        swa_full,
        n_outputs_max,
        headroom_fraction,
        reasons,
        is_estimated,
    )


def _llama(
    target: GpuSet | CpuTarget,
    spec: ModelSpec,
    backend: Backend,
    n_ctx: int,
    n_parallel: int,
    kv: str,
    flash_attn: bool,
    n_batch: int,
    n_ubatch: int,
    kv_unified: bool,
    swa_full: bool | None,
    n_outputs_max: int | None,
    headroom_fraction: float,
    reasons: list[str],
    is_estimated: bool,
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
    dev_of = bl.layer_devices(spec.n_layer, n_dev)
    copies = bl.SCHED_MAX_COPIES if n_dev > 1 else 1
    memory = target.ram_bytes if isinstance(target, CpuTarget) else target.memory_bytes_per_gpu
    card = None if isinstance(target, CpuTarget) else target.card
    overhead = (
        bl.CPU_OVERHEAD_BYTES
        if card is None
        else bl.cuda_overhead_bytes(card.sm_count, card.compute_capability)
    )
    per_gpu: list[GpuBudget] = []
    embd_bytes = sum(t.n_bytes for t in spec.tensors if t.name == TOKEN_EMBD)
    logits_host = bl.output_buffer_bytes(spec, sizes, outputs)
    for d in range(n_dev):
        layers = [il for il in range(spec.n_layer) if dev_of[il] == d]
        has_output = dev_of[spec.n_layer] == d
        weights = 0
        for t in spec.tensors:
            on_dev = (t.layer is not None and t.layer < spec.n_layer and dev_of[t.layer] == d) or (
                t.layer is None and t.name != TOKEN_EMBD and has_output
            )
            if on_dev:
                weights += bl.tensor_device_bytes(t, is_cuda=not is_cpu)
        if has_output and spec.is_output_tied:
            embd = next(t for t in spec.tensors if t.name == TOKEN_EMBD)
            weights += bl.tensor_device_bytes(embd, is_cuda=not is_cpu)
        if is_cpu:
            # one process, one memory: the mmapped file (token_embd included) and the host logits buffer
            weights = spec.weights_bytes
        kv_b = 0
        if kv_ok:
            kv_b = sum(
                bl.kv_layer_bytes(spec, sizes, il, kv, kv, flash_attn=flash_attn, is_cuda=not is_cpu)
                for il in layers
            )
        comp = bl.compute_bytes(
            spec,
            sizes,
            layers,
            has_output=has_output,
            type_k=kv,
            type_v=kv,
            flash_attn=flash_attn,
            is_cuda=not is_cpu,
            n_copies=copies,
        )
        if is_cpu:
            comp += logits_host
        total = weights + kv_b + comp + overhead
        per_gpu.append(
            GpuBudget(
                index=d,
                layers=(layers[0], layers[-1]) if layers else (),
                has_output=has_output,
                weights_bytes=weights,
                kv_bytes=kv_b,
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
            f"layer split over {n_dev} GPUs with pipeline parallelism ({copies} copies of graph inputs)"
        )
    return _assemble(
        target,
        spec,
        backend,
        n_ctx,
        sizes.n_ctx,
        sizes.n_ctx_seq,
        n_parallel,
        kv,
        flash_attn,
        sizes.n_batch,
        sizes.n_ubatch,
        kv_unified,
        per_gpu,
        memory,
        headroom_fraction,
        reasons,
        notes,
        is_estimated,
        host=0 if is_cpu else embd_bytes + logits_host,
        sglang=None,
    )


def _sglang(
    target: GpuSet,
    spec: ModelSpec,
    n_ctx: int,
    n_parallel: int,
    kv: str,
    mem_fraction: float | None,
    headroom_fraction: float,
    reasons: list[str],
    is_estimated: bool,
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
        target,
        spec,
        "sglang",
        n_ctx,
        s.max_total_tokens,
        s.context_length,
        n_parallel,
        kv,
        True,
        s.chunked_prefill_size,
        s.chunked_prefill_size,
        False,
        list(per_gpu),
        memory,
        headroom_fraction,
        reasons,
        notes,
        is_estimated,
        host=0,
        sglang=s,
    )


def _assemble(
    target: GpuSet | CpuTarget,
    spec: ModelSpec,
    backend: Backend,
    n_ctx: int,
    n_ctx_eff: int,
    n_ctx_seq: int,
    n_parallel: int,
    kv: str,
    flash_attn: bool,
    n_batch: int,
    n_ubatch: int,
    kv_unified: bool,
    per_gpu: list[GpuBudget],
    memory: int,
    headroom_fraction: float,
    reasons: list[str],
    notes: list[str],
    is_estimated: bool,
    *,
    host: int,
    sglang: SglangSettings | None,
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


def best_level(
    target: GpuSet | CpuTarget, spec: ModelSpec, levels: Sequence[QuantLevel] = LEVELS, **kwargs: object
) -> tuple[QuantLevel, Budget] | None:
    """The highest-quality level whose budget fits (with headroom), and that budget; None if none fits."""
    for lv in sorted(levels, key=lambda x: -x.quality_rank):
        b = estimate(target, spec, lv, **kwargs)  # type: ignore[arg-type]
        if b.fits:
            return lv, b
    return None


class TableRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    level: str
    weights_bytes: int
    cells: tuple[tuple[int, int, bool], ...] = Field(description="(n_ctx, total_bytes, fits) per context")


class LevelTable(BaseModel):
    """Levels x contexts; best[i] is the best level that fits at contexts[i] (None: none fits)."""

    model_config = ConfigDict(frozen=True)

    contexts: tuple[int, ...]
    rows: tuple[TableRow, ...]
    best: tuple[str | None, ...]


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
