"""BudgetRequest: the settings of one estimate, checked and with each backend's defaults filled in.

`estimate` builds it once from its keyword arguments and hands it whole to each step (the settings'
problems, the backend's memory model, the Budget), so no step re-derives a default or takes twenty
parameters. `n_ctx` is the context of ONE sequence; the KV pool asked for is n_ctx * n_parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantize.budget.types import Backend
from quantize.model.spec import ModelSpec
from server.hardware.cards import Card
from server.hardware.target import CpuTarget, Target


@dataclass(frozen=True)
class BudgetRequest:
    """What to budget: a model (at the level asked for) served by one backend with these settings."""

    target: Target
    spec: ModelSpec  # the model at the level asked for
    is_estimated: bool  # the weights are estimated for a level not on disk
    backend: Backend
    n_ctx: int  # tokens of one sequence
    n_parallel: int
    kv_type: str  # as the backend takes it (None given: f16 for llama.cpp, auto for SGLang)
    flash_attn: bool  # SGLang has no switch: its attention backends always run flash-style
    n_batch: int
    n_ubatch: int
    kv_unified: bool  # llama.cpp's one pool for all sequences; never for SGLang
    swa_full: bool  # llama.cpp keeps every SWA layer's full cache
    n_outputs_max: int  # logits rows llama.cpp reserves (llama-server: n_parallel; the engine: 0)
    mem_fraction: float | None  # SGLang's --mem-fraction-static (None: picked)
    headroom_fraction: float

    @property
    def n_ctx_total(self) -> int:
        """The KV pool asked for, in tokens."""
        return self.n_ctx * self.n_parallel

    @property
    def is_cpu(self) -> bool:
        return isinstance(self.target, CpuTarget)

    @property
    def card(self) -> Card | None:
        """The GPUs' card; None on the CPU."""
        return None if isinstance(self.target, CpuTarget) else self.target.card

    @property
    def n_devices(self) -> int:
        """Devices the model is spread over: the GPUs, or the CPU as one."""
        return max(self.target.count, 1)

    @property
    def memory_bytes(self) -> int:
        """Memory of one device: system RAM on the CPU."""
        t = self.target
        return t.ram_bytes if isinstance(t, CpuTarget) else t.memory_bytes_per_gpu

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * (1 - self.headroom_fraction)

    @property
    def device_name(self) -> str:
        return "CPU (system RAM)" if self.card is None else self.card.name
