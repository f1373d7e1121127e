"""The search over settings and the grid, as pure functions of a fit check and a measure callable.

The callables are `check(setting)` (the VRAM calculator's verdict, free) and `measure(setting)` (start the
server, load it, stop it: the cost). Tests run the same functions on a response surface given as a table.

The grid measures every setting that fits. The search, after skipping what does not fit:
1. n_parallel at the shortest context and the middle batch sizes, coarse to fine: every other value upwards,
   stopping a direction once goodput falls below the best (or stays flat twice), then the skipped neighbours
   of the best, climbing while they improve;
2. n_ubatch, then n_batch, then n_parallel again: from the best so far, climb while goodput improves (the
   batch sizes and the number of sequences interact); a second pass if anything moved;
3. n_ctx, longest first: the first context whose goodput stays within the tie tolerance of the best;
4. if the context changed, n_parallel's neighbours again at the new context.
Per setting, `sweep_rates` finds the goodput: the unpaced run at n_parallel users first (the setting's
capacity); where it misses the SLOs, a bisection on the offered request rate below that capacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from loadtest.selection import (
    Choice,
    Load,
    LoadPoint,
    Setting,
    Skipped,
    Slo,
    Trial,
    choose,
    expand_grid,
    goodput,
    violations,
)
from loadtest.summary import Derived

Check = Callable[[Setting], Skipped | None]
Measure = Callable[[Setting], Trial]
MeasureLoad = Callable[[Load], LoadPoint]
Strategy = Literal["search", "grid"]
# What the search must achieve against the grid (issue 14): its choice's goodput at least 95 % of the grid's
# best, with at most 40 % of the grid's Locust runs.
GOODPUT_GOAL = 0.95
RUNS_GOAL = 0.40
# Rounds of the batch-size / n_parallel climb: a second pass catches an n_parallel that a new batch size
# favours; a third rarely moved anything on the surfaces in the tests.
PASSES = 2


class Space(BaseModel):
    """The values each setting may take (one value: that setting is fixed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_parallel: tuple[int, ...]
    n_ctx: tuple[int, ...]
    n_batch: tuple[int, ...]
    n_ubatch: tuple[int, ...]

    @field_validator("n_parallel", "n_ctx", "n_batch", "n_ubatch")
    @classmethod
    def _sorted(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if not values:
            raise ValueError("give at least one value")
        return tuple(sorted(set(values)))

    @model_validator(mode="after")
    def _some_setting(self) -> Space:
        if not self.grid():
            ubatches, batches = (", ".join(map(str, values)) for values in (self.n_ubatch, self.n_batch))
            raise ValueError(f"no setting to try: every n_ubatch ({ubatches}) is larger than every n_batch "
                             f"({batches}), and llama.cpp caps n_ubatch at n_batch")
        return self

    def grid(self) -> tuple[Setting, ...]:
        return expand_grid(self.n_parallel, self.n_ctx, self.n_batch, self.n_ubatch)


class SearchResult(Derived):
    """What one strategy measured, in the order it measured it, and its choice."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Strategy
    trials: tuple[Trial, ...]
    skipped: tuple[Skipped, ...] = ()
    choice: Choice

    @computed_field  # type: ignore[prop-decorator]
    @property
    def runs(self) -> int:
        """Locust runs, over all settings."""
        return sum(t.runs for t in self.trials)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def starts(self) -> int:
        """Settings started (server starts)."""
        return len(self.trials)


class Efficiency(Derived):
    """The search against the grid on the same machine and workload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    search_runs: int = Field(ge=0)
    grid_runs: int = Field(ge=0)
    search_starts: int = Field(ge=0)
    grid_starts: int = Field(ge=0)
    search_goodput_rps: float = Field(ge=0)
    grid_goodput_rps: float = Field(ge=0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def goodput_ratio(self) -> float:
        return self.search_goodput_rps / self.grid_goodput_rps if self.grid_goodput_rps else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def runs_ratio(self) -> float:
        return self.search_runs / self.grid_runs if self.grid_runs else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def meets_goal(self) -> bool:
        return self.goodput_ratio >= GOODPUT_GOAL and self.runs_ratio <= RUNS_GOAL


def efficiency(search: SearchResult, grid: SearchResult, slo: Slo) -> Efficiency:
    """The search's choice against the best goodput anywhere on the grid."""
    return Efficiency(search_runs=search.runs, grid_runs=grid.runs, search_starts=search.starts,
                      grid_starts=grid.starts, search_goodput_rps=search.choice.goodput_rps,
                      grid_goodput_rps=max((goodput(t, slo) for t in grid.trials), default=0.0))


def sweep_rates(measure_load: MeasureLoad, users: int, slo: Slo, steps: int) -> tuple[LoadPoint, ...]:
    """The load points that find a setting's goodput: `users` unpaced first; where that misses the SLOs,
    `steps` rounds of bisection on the offered rate between 0 and the rate the unpaced run reached."""
    first = measure_load(Load(users=users))
    points = [first]
    if first.summary is None or not violations(first, slo):
        return tuple(points)
    low, high = 0.0, first.summary.requests_per_s
    for _ in range(steps):
        rate = (low + high) / 2
        if rate <= 0:
            break
        point = measure_load(Load(users=users, rate_rps=rate))
        points.append(point)
        if point.summary is not None and not violations(point, slo):
            low = rate
        else:
            high = rate
    return tuple(points)


class _Runs:
    """The settings measured so far (each at most once) and the fit verdicts (all known up front)."""

    def __init__(self, space: Space, check: Check, measure: Measure, slo: Slo) -> None:
        self.space = space
        self.slo = slo
        self.measure = measure
        self.trials: dict[Setting, Trial] = {}
        self.skipped: list[Skipped] = []
        self.fitting: list[Setting] = []
        for setting in space.grid():
            why_not = check(setting)
            if why_not is None:
                self.fitting.append(setting)
            else:
                self.skipped.append(why_not)
        self._fits = set(self.fitting)

    def score(self, setting: Setting) -> float:
        if setting not in self.trials:
            self.trials[setting] = self.measure(setting)
        return goodput(self.trials[setting], self.slo)

    def line(self, through: Setting, axis: str) -> list[Setting]:
        """The fitting settings that differ from `through` in `axis` alone, in ascending order."""
        values: tuple[int, ...] = getattr(self.space, axis)
        moved = (through.model_copy(update={axis: v}) for v in values)
        return [s for s in moved if s in self._fits]

    def result(self, strategy: Strategy) -> SearchResult:
        trials = tuple(self.trials.values())
        return SearchResult(strategy=strategy, trials=trials, skipped=tuple(self.skipped),
                            choice=choose(trials, self.slo, self.skipped))


def run_grid(space: Space, check: Check, measure: Measure, slo: Slo) -> SearchResult:
    """Measure every setting that fits."""
    runs = _Runs(space, check, measure, slo)
    for setting in runs.fitting:
        runs.score(setting)
    return runs.result("grid")


def _climb(line: list[Setting], start: Setting, runs: _Runs) -> Setting:
    """From `start`, step along `line` while goodput improves: upwards first, downwards if up did not help."""
    if start not in line:
        return start
    best, best_g = start, runs.score(start)
    index = line.index(start)
    for direction in (1, -1):
        j = index + direction
        while 0 <= j < len(line):
            g = runs.score(line[j])
            if g <= best_g:
                break
            best, best_g = line[j], g
            j += direction
        if best != start:
            break
    return best


def _coarse_to_fine(line: list[Setting], runs: _Runs) -> Setting:
    """Every other value upwards until goodput falls below the best or stays flat twice, then the neighbours
    of the best."""
    coarse = line[::2] if len(line) > 2 else list(line)
    if line[-1] not in coarse:
        coarse.append(line[-1])
    tol = runs.slo.tie_tolerance
    best, best_g, flat = coarse[0], runs.score(coarse[0]), 0
    for setting in coarse[1:]:
        g = runs.score(setting)
        if g > best_g * (1 + tol):
            best, best_g, flat = setting, g, 0
            continue
        if g < best_g * (1 - tol):
            break  # this direction only gets worse
        flat += 1
        if g > best_g:
            best, best_g = setting, g
        if flat >= 2:
            break
    return _climb(line, best, runs)


def _base(runs: _Runs) -> Setting | None:
    """Where the search starts: the fewest sequences and shortest context that fit, at the middle batches."""
    space = runs.space
    batch = space.n_batch[(len(space.n_batch) - 1) // 2]
    ubatches = [u for u in space.n_ubatch if u <= batch] or list(space.n_ubatch)
    ubatch = ubatches[(len(ubatches) - 1) // 2]
    preferred = [s for s in runs.fitting if s.n_batch == batch and s.n_ubatch == ubatch]
    pool = preferred or runs.fitting
    return min(pool, key=lambda s: (s.n_ctx, s.n_parallel)) if pool else None


def _longest_context(best: Setting, runs: _Runs) -> Setting:
    """The longest context that keeps the best goodput within the tie tolerance, trying the longest first."""
    floor = runs.score(best) * (1 - runs.slo.tie_tolerance)
    for setting in reversed(runs.line(best, "n_ctx")):
        if setting.n_ctx <= best.n_ctx:
            break
        if runs.score(setting) >= floor:
            return setting
    return best


def run_search(space: Space, check: Check, measure: Measure, slo: Slo) -> SearchResult:
    """The search described in the module docstring; every setting is measured at most once."""
    runs = _Runs(space, check, measure, slo)
    start = _base(runs)
    if start is None:
        return runs.result("search")
    best = _coarse_to_fine(runs.line(start, "n_parallel"), runs)
    for _ in range(PASSES):
        before = best
        for axis in ("n_ubatch", "n_batch", "n_parallel"):
            best = _climb(runs.line(best, axis), best, runs)
        if best == before:
            break
    longest = _longest_context(best, runs)
    if longest != best:
        _climb(runs.line(longest, "n_parallel"), longest, runs)
    return runs.result("search")


def run_strategy(strategy: Strategy, space: Space, check: Check, measure: Measure, slo: Slo) -> SearchResult:
    return (run_grid if strategy == "grid" else run_search)(space, check, measure, slo)
