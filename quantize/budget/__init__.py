"""The memory budget: what a model at a quantization level needs on a target, per backend, and the level
`--level auto` picks. Pure functions over the hardware and model facts; the public API is re-exported here."""

from quantize.budget.estimate import (
    DEFAULT_CONTEXTS,
    DEFAULT_HEADROOM_FRACTION,
    best_level,
    estimate,
    level_table,
)
from quantize.budget.problems import BudgetProblem, Effect, ProblemKind
from quantize.budget.types import BACKENDS, Backend, Budget, GpuBudget, LevelTable, TableRow

__all__ = [
    "BACKENDS",
    "DEFAULT_CONTEXTS",
    "DEFAULT_HEADROOM_FRACTION",
    "Backend",
    "Budget",
    "BudgetProblem",
    "Effect",
    "GpuBudget",
    "LevelTable",
    "ProblemKind",
    "TableRow",
    "best_level",
    "estimate",
    "level_table",
]
