"""The VRAM budget calculator: (GPUs or CPU, ModelSpec, level, backend, context settings) -> Budget.

Pure functions. `estimate` gives one Budget; `best_level` the highest-quality level that fits;
`level_table` the grid `edgeserve plan` prints. llama-server and the embedded engine share llama.cpp's
memory model (quantize.budget.llama); sglang uses SGLang's (quantize.budget.sglang). Figures are per GPU:
total_bytes is the memory the backend process holds on its fullest GPU as nvidia-smi reports it, CUDA
context included. `n_ctx` is the context of ONE sequence everywhere; the KV pool is n_ctx * n_parallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quantize.budget import llama as bl
from quantize.budget import problems
from quantize.budget.problems import BudgetProblem, ProblemKind, has_kind
from quantize.budget.request import BudgetRequest
from quantize.budget.sglang import SGLANG_METADATA_BYTES, SglangSettings, sglang_settings, weights_per_gpu
from quantize.budget.types import BACKENDS, Backend, Budget, GpuBudget, LevelTable, TableRow
from quantize.model.kv_types import LLAMA_KV_TYPES, SGLANG_KV_TYPES, needs_flash_attn
from quantize.model.levels import LEVELS, QuantLevel, get_level, level_for_ftype
from quantize.model.spec import TOKEN_EMBD, ModelSpec
from quantize.model.tensor_types import spec_at_level
from server.hardware.cards import GpuSet
from server.hardware.target import CpuTarget, Target

DEFAULT_HEADROOM_FRACTION = 0.05
DEFAULT_CONTEXTS = (2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class _Layout:
    """What a backend's memory model worked out: its cells and batches as it runs them, and each device."""

    kv_cells: int
    kv_cells_per_stream: int
    n_batch: int
    n_ubatch: int
    per_gpu: tuple[GpuBudget, ...]
    host_bytes: int
    sglang: SglangSettings | None = None


def _quant_name(spec: ModelSpec) -> str:
    lv = level_for_ftype(spec.file_type)
    return lv.name if lv else (spec.file_type_name or "unknown")


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
    is_estimated = False
    if level is not None:
        lv = get_level(level)
        if spec.file_type != lv.llama_ftype:
            spec = spec_at_level(spec, lv)
            is_estimated = True
    sglang = backend == "sglang"
    if sglang:
        _check_sglang_target(target)
    req = BudgetRequest(
        target=target,
        spec=spec,
        is_estimated=is_estimated,
        backend=backend,
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        kv_type=kv_type or ("auto" if sglang else "f16"),
        flash_attn=True if sglang else flash_attn,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        kv_unified=False if sglang else kv_unified,
        swa_full=swa_full if swa_full is not None else backend == "embedded",
        n_outputs_max=(
            n_outputs_max if n_outputs_max is not None else (n_parallel if backend == "llama-server" else 0)
        ),
        mem_fraction=mem_fraction,
        headroom_fraction=headroom_fraction,
    )
    found = _settings_problems(req)
    return _sglang(req, found) if sglang else _llama(req, found)


def _check_sglang_target(target: Target) -> None:
    if isinstance(target, CpuTarget):
        raise ValueError("SGLang needs an NVIDIA GPU (SM80+); the CPU runs llama.cpp backends only")
    if not target.card.can_run_sglang:
        major, minor = target.card.compute_capability
        raise ValueError(
            f"SGLang cannot run on {target.card.name} (compute capability {major}.{minor}; "
            "SGLang needs SM80+): use --backend llama-server or embedded"
        )


def _settings_problems(req: BudgetRequest) -> list[BudgetProblem]:
    """What is wrong with the settings themselves, before any memory is counted."""
    kv, card = req.kv_type, req.card
    found = []
    if req.backend == "sglang":
        if kv not in SGLANG_KV_TYPES:
            found.append(problems.sglang_kv_type(kv))
        if kv.startswith("fp8") and card is not None and not card.can_fp8_kv:
            found.append(problems.no_fp8(card.name))
        return found
    if kv not in LLAMA_KV_TYPES:
        found.append(problems.llama_kv_type(kv))
    elif needs_flash_attn(kv) and not req.flash_attn:
        found.append(problems.flash_attn_missing(kv))
    if req.flash_attn and card is not None and not card.has_flash_attn_kernels:
        found.append(problems.no_flash_attn_kernels(card.name))
    return found


def _llama(req: BudgetRequest, found: list[BudgetProblem]) -> Budget:
    """llama.cpp's memory model (llama-server and the embedded engine)."""
    spec = req.spec
    sizes = bl.context_sizes(
        spec,
        req.n_ctx_total,
        req.n_parallel,
        n_batch=req.n_batch,
        n_ubatch=req.n_ubatch,
        kv_unified=req.kv_unified,
        swa_full=req.swa_full,
        n_outputs_max=req.n_outputs_max,
    )
    # llama.cpp sizes no KV for a cache type it does not know; the budget is invalid anyway
    kv_ok = not has_kind(found, ProblemKind.LLAMA_KV_TYPE)
    logits_host = bl.output_buffer_bytes(spec, sizes, req.n_outputs_max)
    embd_bytes = sum(t.n_bytes for t in spec.tensors if t.name == TOKEN_EMBD)
    layout = _Layout(
        kv_cells=sizes.n_ctx,
        kv_cells_per_stream=sizes.n_ctx_seq,
        n_batch=sizes.n_batch,
        n_ubatch=sizes.n_ubatch,
        per_gpu=_llama_devices(req, sizes, logits_host, kv_ok=kv_ok),
        host_bytes=0 if req.is_cpu else embd_bytes + logits_host,
    )
    return _assemble(req, layout, found, _llama_notes(req, sizes))


def _llama_notes(req: BudgetRequest, sizes: bl.LlamaContextSizes) -> list[str]:
    spec, notes = req.spec, []
    if spec.n_ctx_train and req.n_ctx > spec.n_ctx_train:
        notes.append(f"{req.n_ctx} tokens per sequence exceed the trained context of {spec.n_ctx_train}")
    if spec.has_swa:
        notes.append(
            f"sliding window {spec.sliding_window}: {sum(spec.swa_layers)} of {spec.n_layer} layers keep "
            f"{sizes.swa_cells} cells per stream" + (" (swa_full)" if req.swa_full else "")
        )
    if req.n_devices > 1:
        notes.append(
            f"layer split over {req.n_devices} GPUs with pipeline parallelism "
            f"({bl.SCHED_MAX_COPIES} copies of graph inputs)"
        )
    return notes


def _llama_devices(
    req: BudgetRequest, sizes: bl.LlamaContextSizes, logits_host: int, *, kv_ok: bool
) -> tuple[GpuBudget, ...]:
    """Each device's share under llama.cpp; on the CPU one process holds it all (the mmapped file,
    token_embd included, and the logits buffer)."""
    spec, card = req.spec, req.card
    overhead = (
        bl.CPU_OVERHEAD_BYTES
        if card is None
        else bl.cuda_overhead_bytes(card.sm_count, card.compute_capability)
    )
    shares = bl.device_shares(
        spec, sizes, req.n_devices, req.kv_type,
        flash_attn=req.flash_attn, is_cuda=not req.is_cpu, kv_ok=kv_ok,
    )
    out = []
    for share in shares:
        weights = spec.weights_bytes if req.is_cpu else share.weights_bytes
        comp = share.compute_bytes + (logits_host if req.is_cpu else 0)
        total = weights + share.kv_bytes + comp + overhead
        out.append(
            GpuBudget(
                index=share.index,
                layers=share.layers,
                has_output=share.has_output,
                weights_bytes=weights,
                kv_bytes=share.kv_bytes,
                compute_bytes=comp,
                overhead_bytes=overhead,
                total_bytes=total,
                memory_bytes=req.memory_bytes,
                headroom_bytes=req.memory_bytes - total,
                fits=total <= req.usable_bytes,
            )
        )
    return tuple(out)


def _sglang(req: BudgetRequest, found: list[BudgetProblem]) -> Budget:
    """SGLang's memory model: tensor parallel over the GPUs, a static fraction holding weights and pool."""
    assert isinstance(req.target, GpuSet)
    spec, memory, tp = req.spec, req.memory_bytes, req.target.count
    heads = max(spec.n_head_kv)
    if heads % tp and tp % heads:
        found = [*found, problems.kv_heads_split(heads, tp)]
    s = sglang_settings(
        memory,
        spec,
        tp=tp,
        n_ctx=req.n_ctx,
        n_parallel=req.n_parallel,
        kv_type=req.kv_type,
        mem_fraction=req.mem_fraction,
        headroom_fraction=req.headroom_fraction,
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
    pool_holds = s.kv_pool_tokens >= req.n_ctx_total
    if not pool_holds:
        found = [*found, problems.kv_pool_short(s.kv_pool_tokens, req.n_ctx_total)]
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
            fits=total <= req.usable_bytes and pool_holds,
        )
        for i in range(tp)
    )
    layout = _Layout(
        kv_cells=s.kv_pool_tokens,
        kv_cells_per_stream=s.n_ctx,
        n_batch=s.chunked_prefill_size,
        n_ubatch=s.chunked_prefill_size,
        per_gpu=per_gpu,
        host_bytes=0,
        sglang=s,
    )
    return _assemble(req, layout, found, notes)


def _assemble(req: BudgetRequest, layout: _Layout, found: list[BudgetProblem], notes: list[str]) -> Budget:
    worst = max(layout.per_gpu, key=lambda g: g.total_bytes)
    if not found and not all(g.fits for g in layout.per_gpu):
        # Nothing else explains it: say what the fullest device needs against what it may use.
        found = [problems.over_memory(worst.total_bytes, req.usable_bytes)]
    memory = req.memory_bytes
    return Budget(
        card=req.target.card_id,
        card_name=req.device_name,
        gpus=req.target.count,
        backend=req.backend,
        model=req.spec.name,
        quant=_quant_name(req.spec),
        is_estimated_quant=req.is_estimated,
        n_ctx=req.n_ctx,
        n_ctx_total=req.n_ctx_total,
        kv_cells=layout.kv_cells,
        kv_cells_per_stream=layout.kv_cells_per_stream,
        n_parallel=req.n_parallel,
        kv_type=req.kv_type,
        flash_attn=req.flash_attn,
        n_batch=layout.n_batch,
        n_ubatch=layout.n_ubatch,
        kv_unified=req.kv_unified,
        weights_bytes=worst.weights_bytes,
        kv_bytes=worst.kv_bytes,
        compute_bytes=worst.compute_bytes,
        overhead_bytes=worst.overhead_bytes,
        total_bytes=worst.total_bytes,
        memory_bytes=memory,
        usable_bytes=int(req.usable_bytes),
        headroom_fraction=req.headroom_fraction,
        headroom_bytes=memory - worst.total_bytes,
        host_bytes=layout.host_bytes,
        per_gpu=layout.per_gpu,
        sglang=layout.sglang,
        problems=tuple(found),
        notes=tuple(notes),
    )


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
