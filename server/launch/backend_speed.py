"""Measured speed of the embedded engine against llama-server, as the backend choice uses it.

The `auto` backend rule and the llama-server builder read it from backend_speed.yaml (package data), written
from docs/BENCHMARKS.md.

A measurement holds for the GPU it ran on; the plan's reasons quote it with that GPU, the model and the date,
so a user on another card can see what the choice rests on.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict

DATA = "backend_speed.yaml"
# What llama-server runs as: its default, or with --backend-sampling.
LLAMA_SERVER = "llama-server"
LLAMA_SERVER_BS = "llama-server-bs"


class SpeedRecord(BaseModel):
    """One side-by-side run: the engine's throughput over each llama-server mode, by shape and streams."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: str
    model: str
    date: str
    slots: int
    over: dict[str, dict[str, dict[int, float]]]

    def at(self, mode: str, streams: int) -> dict[str, float]:
        """The ratio of every shape at the measured stream count nearest `streams` (1 when in doubt)."""
        out = {}
        for shape, by_streams in self.over[mode].items():
            nearest = min(by_streams, key=lambda c: (abs(math.log(c) - math.log(max(streams, 1))), c))
            out[shape] = by_streams[nearest]
        return out

    def where(self) -> str:
        return f"{self.gpu}, {self.model}, {self.date}"


@cache
def records() -> tuple[SpeedRecord, ...]:
    raw = yaml.safe_load(resources.files(__package__).joinpath(DATA).read_text())
    return tuple(SpeedRecord.model_validate(item) for item in raw or ())


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


class Verdict(BaseModel):
    """The engine against the faster llama-server mode at one stream count: the geometric mean over the
    measured request shapes, and the shapes where llama-server was faster."""

    model_config = ConfigDict(frozen=True)

    ratio: float
    slower: dict[str, float]
    record: SpeedRecord

    @property
    def engine_wins(self) -> bool:
        return self.ratio >= 1.0

    def why(self, streams: int) -> str:
        head = (f"measured ({self.record.where()}): the embedded engine makes {self.ratio:.2f}x the "
                f"tokens/s of llama-server --backend-sampling at ~{streams} streams (geometric mean over "
                "request shapes)")
        if not self.slower:
            return head
        worse = ", ".join(f"{shape} {r:.2f}x" for shape, r in sorted(self.slower.items()))
        return f"{head}; slower on {worse}"


def engine_verdict(streams: int) -> Verdict | None:
    """The latest measurement's verdict for `streams` concurrent requests (None: nothing measured)."""
    if not records():
        return None
    record = max(records(), key=lambda r: r.date)
    ratios = record.at(LLAMA_SERVER_BS, streams)
    return Verdict(ratio=geomean(list(ratios.values())), slower={s: r for s, r in ratios.items() if r < 1.0},
                   record=record)


def backend_sampling_wins() -> tuple[int, int, SpeedRecord] | None:
    """How many measured (shape, streams) cells llama-server --backend-sampling won over its default, of how
    many, in the latest measurement (the engine's ratio over each: the smaller ratio is the faster mode)."""
    if not records():
        return None
    record = max(records(), key=lambda r: r.date)
    default, bs = record.over[LLAMA_SERVER], record.over[LLAMA_SERVER_BS]
    cells = [(shape, c) for shape in default for c in default[shape] if c in bs.get(shape, {})]
    wins = sum(1 for shape, c in cells if bs[shape][c] < default[shape][c])
    return wins, len(cells), record
