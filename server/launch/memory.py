"""The budget behind a plan: quantize.budget.estimate for the planned settings, and fitting them to the card.

A setting the user pinned (CLI flag or EDGESERVE_* variable) is never changed here; a profile or default value
that does not fit the card is stepped down (context first, then parallel sequences) and the reason says so.
What still does not fit is left to the start-up OOM ladder, with a reason saying that too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantize.budget import Backend, Budget, estimate
from quantize.model.kv_types import kv_element_bytes
from quantize.model.units import MIB
from server.hardware.target import CpuTarget
from server.launch.context import BuildContext, ReasonLog
from server.launch.plan import LaunchPlan, MemoryEstimate
from server.launch.resolve import halve_ctx
from server.llama.offload import offload_layers

# The budget's context floor when fitting a profile value (the user can still ask for less).
FIT_MIN_CTX = 1024
# The CPU shares RAM with everything else on the machine: plan for three quarters of it.
CPU_RAM_HEADROOM = 0.25


class LlamaFit(BaseModel):
    """llama.cpp settings after fitting, with the memory they need."""

    model_config = ConfigDict(frozen=True)

    n_ctx: int
    n_parallel: int
    kv_type: str
    flash_attn: str
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    kv_unified: bool = False
    n_threads: int | None = None
    memory: MemoryEstimate | None = None


class SglangFit(BaseModel):
    model_config = ConfigDict(frozen=True)

    n_ctx: int
    n_parallel: int
    mem_fraction: float | None
    memory: MemoryEstimate | None = None


def _utilization(ctx: BuildContext, log: ReasonLog) -> float:
    value, source = ctx.setting("gpu_memory_utilization")
    log.add("gpu_memory_utilization", value, source, "share of each GPU's memory the plan may use")
    return float(value)


def _to_estimate(b: Budget, capacity_bytes: int | None) -> MemoryEstimate:
    return MemoryEstimate(
        weights_bytes=b.weights_bytes,
        kv_bytes=b.kv_bytes,
        compute_bytes=b.compute_bytes,
        overhead_bytes=b.overhead_bytes,
        capacity_bytes=capacity_bytes,
    )


def _scale_offload(m: MemoryEstimate, n_gpu_layers: int, n_layer: int) -> MemoryEstimate:
    """Partial offload: weights and KV move with their layers (the budget models full offload only)."""
    share = n_gpu_layers / offload_layers(n_layer)
    return m.model_copy(
        update={"weights_bytes": int(m.weights_bytes * share), "kv_bytes": int(m.kv_bytes * share)}
    )


def fit_llama(
    ctx: BuildContext, wanted: LlamaFit, *, log: ReasonLog, backend: Backend = "llama-server"
) -> LlamaFit:
    """Estimate llama.cpp's memory for the `wanted` settings and step unpinned ones down until they fit."""
    fit = wanted
    n_ctx, n_parallel = wanted.n_ctx, wanted.n_parallel
    kv_type, flash_attn, n_gpu_layers = wanted.kv_type, wanted.flash_attn, wanted.n_gpu_layers
    target = ctx.target
    if isinstance(target, CpuTarget):
        headroom = CPU_RAM_HEADROOM
        capacity = int(target.ram_bytes * (1 - headroom))
    else:
        util = _utilization(ctx, log)
        headroom = 1 - util
        capacity = int(target.memory_bytes_per_gpu * util)

    def budget(c: int, p: int) -> Budget:
        return estimate(
            target,
            ctx.spec,
            backend=backend,
            n_ctx=c,
            n_parallel=p,
            kv_type=kv_type,
            flash_attn=flash_attn != "off",
            n_batch=wanted.n_batch,
            n_ubatch=wanted.n_ubatch,
            kv_unified=wanted.kv_unified,
            headroom_fraction=headroom,
        )

    b = budget(n_ctx, n_parallel)
    first = b
    if ctx.all_on_gpu(n_gpu_layers):
        while not b.fits and b.is_valid and not ctx.is_pinned("n_ctx") and n_ctx > FIT_MIN_CTX:
            n_ctx = max(FIT_MIN_CTX, halve_ctx(n_ctx))
            b = budget(n_ctx, n_parallel)
        while not b.fits and b.is_valid and not ctx.is_pinned("n_parallel") and n_parallel > 1:
            n_parallel = max(1, n_parallel // 2)
            b = budget(n_ctx, n_parallel)
        if n_ctx != fit.n_ctx:
            log.add(
                "n_ctx",
                n_ctx,
                "derived",
                f"{fit.n_ctx} tokens per sequence needs "
                f"{first.total_bytes / MIB:,.0f} MiB, over the {capacity / MIB:,.0f} MiB budget",
            )
        if n_parallel != fit.n_parallel:
            log.add("n_parallel", n_parallel, "derived", f"{fit.n_parallel} sequences do not fit the budget")
    mem = _to_estimate(b, capacity)
    if ctx.gpus and not ctx.all_on_gpu(n_gpu_layers):
        mem = _scale_offload(mem, n_gpu_layers, ctx.spec.n_layer)
    log.add(
        "expected_total_bytes",
        mem.total_bytes,
        "derived",
        f"budget: weights {mem.weights_bytes / MIB:,.0f} + KV {mem.kv_bytes / MIB:,.0f} + compute "
        f"{mem.compute_bytes / MIB:,.0f} + overhead {mem.overhead_bytes / MIB:,.0f} MiB per device"
        + ("" if mem.fits else "; over budget: the start-up OOM ladder will step down"),
    )
    return fit.model_copy(update={"n_ctx": n_ctx, "n_parallel": n_parallel, "memory": mem})


def fit_sglang(
    ctx: BuildContext, *, n_ctx: int, n_parallel: int, kv_type: str, tp_size: int, log: ReasonLog
) -> SglangFit:
    """SGLang's memory and --mem-fraction-static; the pool must hold n_ctx * n_parallel tokens."""
    gpu_set = ctx.gpu_set
    assert gpu_set is not None
    util = _utilization(ctx, log)  # the capacity figure; SGLang's own share is --mem-fraction-static
    mem_fraction, frac_source = ctx.setting("mem_fraction")
    target = gpu_set.model_copy(update={"count": tp_size})
    capacity = int(gpu_set.memory_bytes_per_gpu * util)

    def budget(c: int, p: int) -> Budget:
        return estimate(
            target,
            ctx.spec,
            backend="sglang",
            n_ctx=c,
            n_parallel=p,
            kv_type=kv_type,
            mem_fraction=mem_fraction,
        )

    def fits(b: Budget, c: int, p: int) -> bool:
        # SGLang fills its static fraction whatever the requests need, so the question is whether the pool
        # that fraction leaves holds the plan's tokens (--max-total-tokens then caps it at exactly that).
        return b.is_valid and b.sglang is not None and b.sglang.kv_pool_tokens >= c * p

    b = budget(n_ctx, n_parallel)
    first_ctx, first_parallel = n_ctx, n_parallel
    while (
        not fits(b, n_ctx, n_parallel)
        and b.is_valid
        and not ctx.is_pinned("n_ctx")
        and n_ctx > FIT_MIN_CTX
    ):
        n_ctx = max(FIT_MIN_CTX, halve_ctx(n_ctx))
        b = budget(n_ctx, n_parallel)
    while (
        not fits(b, n_ctx, n_parallel)
        and b.is_valid
        and not ctx.is_pinned("n_parallel")
        and n_parallel > 1
    ):
        n_parallel = max(1, n_parallel // 2)
        b = budget(n_ctx, n_parallel)
    if n_ctx != first_ctx:
        log.add("n_ctx", n_ctx, "derived", f"{first_ctx} tokens per sequence do not fit SGLang's KV pool")
    if n_parallel != first_parallel:
        log.add(
            "n_parallel", n_parallel, "derived", f"{first_parallel} sequences do not fit SGLang's KV pool"
        )
    frac = b.sglang.mem_fraction if b.sglang else mem_fraction
    if mem_fraction is None and frac is not None:
        default = b.sglang.sglang_default_mem_fraction if b.sglang else "?"
        why = f"SGLang's own heuristic for this card ({default}) less a small reserve for fragmentation"
        log.add("mem_fraction", frac, "derived", why)
    elif frac is not None:
        log.add("mem_fraction", frac, frac_source, "--mem-fraction-static")
    mem = _to_estimate(b, capacity)
    # --max-total-tokens caps the pool at what the plan needs, so count that, not the whole fraction.
    if b.sglang is not None:
        need = n_ctx * n_parallel * b.sglang.kv_cell_bytes
        mem = mem.model_copy(update={"kv_bytes": min(mem.kv_bytes, need)})
    log.add(
        "expected_total_bytes",
        mem.total_bytes,
        "derived",
        f"budget: weights {mem.weights_bytes / MIB:,.0f} + KV {mem.kv_bytes / MIB:,.0f} + activations "
        f"{mem.compute_bytes / MIB:,.0f} + overhead {mem.overhead_bytes / MIB:,.0f} MiB per GPU"
        + (
            ""
            if fits(b, n_ctx, n_parallel)
            else f"; does not fit: {'; '.join(b.reasons) or 'KV pool too small'}"
        ),
    )
    return SglangFit(n_ctx=n_ctx, n_parallel=n_parallel, mem_fraction=frac, memory=mem)


def rescale(old: LaunchPlan, new: LaunchPlan) -> MemoryEstimate | None:
    """The old plan's estimate moved to the new plan's settings (for ladder steps, without the model at hand).

    KV scales with the pool's tokens and the element size; weights with the file size (another quant) and the
    share of layers on the GPU; a plan moved to the CPU has no GPU estimate.
    """
    m = old.memory
    if m is None or new.gpus == 0 or new.n_gpu_layers == 0:
        return None
    kv = m.kv_bytes * (new.n_ctx_total / old.n_ctx_total)
    kv *= kv_element_bytes(new.kv_type) / kv_element_bytes(old.kv_type)
    weights = float(m.weights_bytes)
    if new.model_bytes and old.model_bytes and new.model_path != old.model_path:
        weights *= new.model_bytes / old.model_bytes
    if new.n_gpu_layers is not None and old.n_gpu_layers and new.n_gpu_layers != old.n_gpu_layers:
        share = new.n_gpu_layers / old.n_gpu_layers
        weights *= share
        kv *= share
    return m.model_copy(update={"weights_bytes": int(weights), "kv_bytes": max(0, int(kv))})


__all__ = ["LlamaFit", "SglangFit", "fit_llama", "fit_sglang", "rescale"]
