"""The values the budget calculator returns (quantize.budget): Budget, per-device GpuBudget, LevelTable.

A Budget's verdicts and reasons are derived from its typed problems (quantize.budget.problems), so they
cannot disagree with them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from quantize.budget.problems import BudgetProblem, ProblemKind, blocks_fit, has_kind, is_valid
from quantize.budget.sglang import SglangSettings

Backend = Literal["llama-server", "embedded", "sglang"]
BACKENDS: tuple[Backend, ...] = ("llama-server", "embedded", "sglang")


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
    n_ctx: int = Field(description="context of one sequence (prompt + completion), tokens")
    n_ctx_total: int = Field(description="the KV pool asked for: n_ctx * n_parallel (llama-server's -c)")
    kv_cells: int = Field(description="KV cells after llama.cpp's padding / SGLang's pool tokens")
    kv_cells_per_stream: int = Field(
        description="cells of one KV stream: one sequence's (split cache) or the shared pool (unified)"
    )
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
    host_bytes: int = Field(description="host memory besides the GPU: token_embd, logits buffer")
    per_gpu: tuple[GpuBudget, ...] = ()
    sglang: SglangSettings | None = None
    problems: tuple[BudgetProblem, ...] = Field(
        default=(), description="what is wrong with the settings; each kind decides its effect on the verdict"
    )
    notes: tuple[str, ...] = ()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fits(self) -> bool:
        """Every device fits its usable memory and no problem stands in the way."""
        return all(g.fits for g in self.per_gpu) and not blocks_fit(self.problems)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def is_valid(self) -> bool:
        """False when the settings cannot start (e.g. a quantized V cache without flash attention)."""
        return is_valid(self.problems)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def reasons(self) -> tuple[str, ...]:
        """The problems' messages, in order: what `edgeserve plan` and refusals print."""
        return tuple(p.message for p in self.problems)

    def has(self, kind: ProblemKind) -> bool:
        """Whether the budget has a problem of this kind (decide on kinds, never on the reasons' text)."""
        return has_kind(self.problems, kind)


class TableRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    level: str
    weights_bytes: int
    cells: tuple[tuple[int, int, bool], ...] = Field(
        description="(n_ctx per sequence, total_bytes, fits) per context"
    )


class LevelTable(BaseModel):
    """Levels x contexts (n_ctx per sequence); best[i] is the best level that fits at contexts[i] (None: none
    fits)."""

    model_config = ConfigDict(frozen=True)

    contexts: tuple[int, ...]
    rows: tuple[TableRow, ...]
    best: tuple[str | None, ...]
