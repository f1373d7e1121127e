"""What a tune produced, as results.json holds it.

The conditions, what each strategy measured and chose, the search's efficiency against the grid, the
`edgeserve launch` flags that reproduce the winner, and where the tuned profile went if it was saved.
`summary_json` is `--json`'s output.
"""

from __future__ import annotations

import shlex
from typing import Any

from pydantic import BaseModel, ConfigDict

from loadtest.runner import BenchConfig
from loadtest.search import Efficiency, SearchResult, Space
from loadtest.selection import Choice, Setting, Skipped, Slo, Trial, best_point, goodput

# Launch settings a tune takes once and holds for every setting it tries: the winner ran with them too.
HELD_FIXED = ("n_threads", "n_gpu_layers", "kv_type")


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

    def winner_values(self) -> dict[str, Any] | None:
        """The settings the chosen trial ran with, in profile keys: the searched ones and those the tune held
        fixed (--n-threads, --n-gpu-layers, --kv-type); None when nothing was chosen."""
        best = self.choice.best
        if best is None:
            return None
        request = self.bench.request
        held = {k: getattr(request, k) for k in HELD_FIXED if getattr(request, k) is not None}
        return {**best.setting.values(), **held}

    def launch_argv(self) -> tuple[str, ...] | None:
        """`edgeserve launch` with the flags that run the winner as it was measured (None: no winner)."""
        values = self.winner_values()
        if values is None:
            return None
        request = self.bench.request
        argv = ["edgeserve", "launch", "--backend", self.backend]
        if request.card != "auto":
            argv += ["--card", request.card]
        if request.gpus is not None:
            argv += ["--gpus", str(request.gpus)]
        if request.model_path:
            argv += ["--model-path", request.model_path]
        for key, value in values.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        return tuple(argv)

    def launch_command(self) -> str | None:
        argv = self.launch_argv()
        return shlex.join(argv) if argv else None


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
            "launch": result.launch_command(), "profile": result.profile_path, "files": files}
