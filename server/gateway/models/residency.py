"""Which models stay in memory: a pure function of the resident set, the budget and the model asked for.

The memory plan decides, never a guess: a model loads when its planned memory fits beside the resident ones;
else idle ones are evicted (lowest priority first, then least recently used; pinned and busy ones never)
until it fits. When it cannot fit now the answer says whether waiting can help (models busy with requests or
still loading will become idle) or not (pinned models hold the memory, or the model exceeds the whole budget),
and names what would have to go.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from quantize.model.units import MIB


@dataclass(frozen=True)
class Resident:
    """A model that holds memory now (loaded, or loading)."""

    name: str
    planned_bytes: int
    last_used: float  # monotonic time of its last request (or of its load)
    pinned: bool = False
    in_flight: int = 0  # requests running on it
    loading: bool = False
    priority: int = 0

    @property
    def evictable(self) -> bool:
        return not self.pinned and self.in_flight == 0 and not self.loading


class Action(Enum):
    READY = "ready"  # resident already
    LOAD = "load"  # load it, after evicting `evict` (in that order)
    WAIT = "wait"  # cannot fit now; busy or loading models will become idle: wait, then ask again
    REFUSE = "refuse"  # cannot fit while the pinned models stay, or never: 503 now


@dataclass(frozen=True)
class Decision:
    """The planner's answer for one model."""

    action: Action
    evict: tuple[str, ...] = ()  # models to unload first, in order (LOAD only)
    blockers: tuple[str, ...] = ()  # what would have to go besides the idle ones (WAIT, REFUSE)
    reason: str = ""  # for the log and the 503's message

    @property
    def can_serve(self) -> bool:
        return self.action in (Action.READY, Action.LOAD)


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def _describe(r: Resident) -> str:
    why = ("pinned" if r.pinned else "loading" if r.loading
           else f"{r.in_flight} request{'s' if r.in_flight != 1 else ''} running")
    return f"{r.name} ({_mib(r.planned_bytes)}, {why})"


def eviction_order(residents: tuple[Resident, ...]) -> list[Resident]:
    """Idle models in the order they go: lowest priority first, then least recently used."""
    return sorted((r for r in residents if r.evictable), key=lambda r: (r.priority, r.last_used, r.name))


def decide(residents: tuple[Resident, ...], budget_bytes: int, name: str, planned_bytes: int) -> Decision:
    """Load `name` (planned_bytes), evicting what must go, or say why not. Pure."""
    if any(r.name == name for r in residents):
        return Decision(Action.READY, reason=f"{name} is resident")
    if planned_bytes > budget_bytes:
        return Decision(Action.REFUSE, reason=f"{name} needs {_mib(planned_bytes)}, more than the whole "
                        f"{_mib(budget_bytes)} budget: it cannot load on this server with these settings")
    used = sum(r.planned_bytes for r in residents)
    free = budget_bytes - used
    head = (f"{name} needs {_mib(planned_bytes)}; {_mib(max(free, 0))} of the {_mib(budget_bytes)} budget "
            "are free")
    evict: list[str] = []
    for r in eviction_order(residents):
        if free >= planned_bytes:
            break
        evict.append(r.name)
        free += r.planned_bytes
    if free >= planned_bytes:
        reason = f"{head}; unloading {', '.join(evict)}" if evict else f"{head}; it fits"
        return Decision(Action.LOAD, evict=tuple(evict), reason=reason)
    # Even with every idle model gone it does not fit: name the rest that holds memory, busy ones first
    # (they free it once their requests end), pinned ones last (they never do).
    held = sorted((r for r in residents if not r.evictable), key=lambda r: (r.pinned, r.planned_bytes))
    blockers: list[Resident] = []
    transient_free = free
    for r in held:
        if transient_free >= planned_bytes:
            break
        blockers.append(r)
        transient_free += r.planned_bytes
    names = tuple(r.name for r in blockers)
    idle = f" besides the idle {', '.join(evict)}" if evict else ""
    message = f"{head}; it would have to unload {', '.join(_describe(r) for r in blockers)}{idle}"
    if any(r.pinned for r in blockers):
        return Decision(Action.REFUSE, blockers=names, reason=f"{message}; pinned models are never evicted")
    return Decision(Action.WAIT, blockers=names, reason=message)
