"""The memory figures residency is decided by: what one model's plan says it holds, and the budget they share.

An embedded model's figure is the engine's own pre-flight budget (server/engine/preflight.engine_budget) for
its settings on this machine: the figure that matched measured use. A llama-server model's comes from its
launch plan (the CLI hands the pool that kind). On the CPU the budget is RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantize.model.reader import read_spec
from quantize.model.units import MIB
from server.engine.preflight import engine_budget, gpu_offload_wanted
from server.gateway.models.models_file import ModelEntry, ModelsFile
from server.hardware.target import CpuTarget, Target

# The share of a card the plan may use, as `edgeserve launch` (gpu_memory_utilization) defaults it.
GPU_BUDGET_SHARE = 0.9
# The CPU shares RAM with everything else on the machine: plan for three quarters of what is available.
RAM_BUDGET_SHARE = 0.75


@dataclass(frozen=True)
class Where:
    """Where the models run: the target the plans are made for, and whether the engine offloads to a GPU."""

    target: Target
    on_gpu: bool


def where_models_run(entries: tuple[ModelEntry, ...]) -> Where:
    """The GPU set of this machine when any embedded model offloads to it, else the CPU (RAM)."""
    on_gpu = any(e.backend == "llama-server" or gpu_offload_wanted(e.engine_config()) for e in entries)
    if on_gpu:
        from server.hardware.detect import detect, gpu_set_from_detection

        gpus = gpu_set_from_detection(detect())
        if gpus is not None:
            return Where(gpus, True)
    from server.hardware.target import cpu_target

    return Where(cpu_target(), False)


def budget_bytes(models: ModelsFile, where: Where) -> int:
    """The file's budget_mib, else one card x GPU_BUDGET_SHARE, else RAM available x RAM_BUDGET_SHARE."""
    if models.budget_mib is not None:
        return models.budget_mib * MIB
    if isinstance(where.target, CpuTarget):
        from server.hardware.available import available_ram

        ram = available_ram()
        free = ram.free_bytes if ram is not None else where.target.ram_bytes
        return int(free * RAM_BUDGET_SHARE)
    return int(where.target.memory_bytes_per_gpu * GPU_BUDGET_SHARE)


def embedded_planned_bytes(entry: ModelEntry, where: Where) -> int:
    """The engine's pre-flight figure for this model's settings (the fullest device's total)."""
    config = entry.engine_config()
    spec = read_spec(config.model_file())
    return engine_budget(config, spec, where.target, on_gpu=where.on_gpu).total_bytes
