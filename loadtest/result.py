"""What a tune produced, as results.json holds it: the conditions, what each strategy measured and chose,
the search's efficiency against the grid, and where the tuned profile went. `summary_json` is `--json`'s
output."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from loadtest.runner import BenchConfig
from loadtest.search import Efficiency, SearchResult, Space
from loadtest.selection import Choice, Setting, Skipped, Slo, Trial, best_point, goodput


class TuneResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    date: str
    machine: str
    card: str
    backend: str
    model: str
    space: Space
    slo: Slo
    bench: BenchConfig
    search: SearchResult | None = None
    grid: SearchResult | None = None
    efficiency: Efficiency | None = None
    profile_path: str | None = None

    @property
    def primary(self) -> SearchResult:
        """The strategy whose choice counts: the search where it ran, else the grid."""
        found = self.search or self.grid
        if found is None:
            raise ValueError("a tune result without a search or a grid")
        return found

    @property
    def choice(self) -> Choice:
        return self.primary.choice

    def trials(self) -> tuple[Trial, ...]:
        """Every setting measured by either strategy, once each, in the order they ran."""
        seen: dict[Setting, Trial] = {}
        for result in (self.search, self.grid):
            for trial in result.trials if result else ():
                seen.setdefault(trial.setting, trial)
        return tuple(seen.values())

    def skipped(self) -> tuple[Skipped, ...]:
        return self.primary.skipped


def summary_json(result: TuneResult, files: dict[str, str]) -> dict[str, Any]:
    """The answer in a few keys: the chosen settings and their figures, the run counts, the files written."""
    choice = result.choice
    best: dict[str, Any] | None = None
    if choice.best is not None:
        point = best_point(choice.best, result.slo)
        peak = choice.best.peak
        best = {**choice.best.setting.values(), "goodput_rps": round(goodput(choice.best, result.slo), 4),
                "tokens_per_s": round(peak.tokens_per_s, 2) if peak else None,
                "ttft_p95_ms": point.summary.ttft_p95_ms if point and point.summary else None,
                "memory_bytes": choice.best.memory_bytes}
    runs = {name: {"runs": r.runs, "starts": r.starts}
            for name, r in (("search", result.search), ("grid", result.grid)) if r is not None}
    return {"date": result.date, "card": result.card, "backend": result.backend, "model": result.model,
            "best": best, "reason": choice.reason, "slo": result.slo.describe(), "runs": runs,
            "skipped": len(result.skipped()),
            "efficiency": result.efficiency.model_dump() if result.efficiency else None,
            "profile": result.profile_path, "files": files}
