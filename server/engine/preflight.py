"""Before the engine allocates: do its settings fit the memory free right now (the budget as a gate), and
will the GPU it is asked for really be used?

llama.cpp asked for more than there is either fails late and vaguely ("could not create a context") or, on a
machine that overcommits, gets the memory and is killed by the kernel once it touches it. The engine asks the
budget calculator first, with the numbers it is about to use, against the free memory of the devices it will
run on, and refuses with what the settings need, what is free and what would fit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from quantize.budget import estimate
from quantize.budget.gate import budget_refusal, check_fit, nearest_fit
from quantize.budget.types import Budget
from quantize.model.reader import read_spec
from quantize.model.spec import ModelSpec
from server.engine.config import EngineConfig, cap_n_ctx
from server.engine.errors import DoesNotFitError
from server.engine.types import Placement
from server.hardware.available import available_ram, available_vram
from server.hardware.target import CpuTarget, Target

log = logging.getLogger(__name__)


def gpu_offload_wanted(config: EngineConfig) -> bool:
    """Whether the engine will put layers on a GPU: asked for, and this llama.cpp build can."""
    import llama_cpp.llama_cpp as lc

    return config.n_gpu_layers != 0 and bool(lc.llama_supports_gpu_offload())


def _target(on_gpu: bool) -> tuple[Target, list[tuple[str, int]]] | None:
    """Where the engine will run and the free bytes of each device there (None: nothing readable)."""
    if on_gpu:
        from server.hardware.detect import detect, gpu_set_from_detection

        gpus = gpu_set_from_detection(detect())
        free = [(a.device, a.free_bytes) for a in available_vram()]
        return (gpus, free) if gpus is not None and free else None
    ram = available_ram()
    if ram is None:
        return None
    return CpuTarget(ram_bytes=max(ram.free_bytes, 1)), [(ram.device, ram.free_bytes)]


def engine_budget(config: EngineConfig, spec: ModelSpec, target: Target, *, on_gpu: bool,
                  n_ctx: int | None = None, n_parallel: int | None = None) -> Budget:
    """What the engine will allocate for `config` (n_ctx capped at the model's training context, as the
    engine caps it)."""
    kv_unified = config.unified_on(on_gpu)
    return estimate(
        target, spec, backend="embedded",
        n_ctx=cap_n_ctx(n_ctx or config.n_ctx, spec.n_ctx_train), n_parallel=n_parallel or config.n_parallel,
        kv_type=config.kv_type, flash_attn=config.flash_attn != "off", n_batch=config.n_batch,
        n_ubatch=config.n_ubatch, kv_unified=kv_unified,
    )


def check_memory(config: EngineConfig, path: Path, *, on_gpu: bool) -> None:
    """Raise DoesNotFitError when `config` cannot fit the memory free now; silent where nothing can be read
    (no /proc/meminfo, no NVML) or the file is not a GGUF the calculator reads (llama.cpp then says why)."""
    where = _target(on_gpu)
    if where is None:
        return
    target, free = where
    try:
        spec = read_spec(path)
    except (OSError, ValueError):
        return
    budget = engine_budget(config, spec, target, on_gpu=on_gpu)
    check = check_fit(budget, free)
    if check.fits:
        return

    def fits(n_ctx: int, n_parallel: int) -> bool:
        trial = engine_budget(config, spec, target, on_gpu=on_gpu, n_ctx=n_ctx, n_parallel=n_parallel)
        return check_fit(trial, free).fits

    raise DoesNotFitError(budget_refusal(budget, check, nearest_fit(fits, budget.n_ctx, budget.n_parallel)))


def warn_if_gpu_unused(placement: Placement, config: EngineConfig) -> None:
    """Never silent: layers asked for on a GPU that this llama.cpp build cannot use, with a GPU present."""
    if config.n_gpu_layers == 0 or placement.gpu_offload_supported:
        return
    from server.hardware.detect import detect

    gpus = detect().gpus
    if gpus:
        log.warning("an NVIDIA GPU is here (%s) but this llama.cpp build has no GPU support: the model "
                    "runs on the CPU. Rebuild it with CUDA: phase1_foundation/setup_env.sh on a host with "
                    "the CUDA toolkit (12.x for Pascal and Volta cards)", gpus[0].name)
