"""What the supervisor saw happen to its backend, one event at a time (logged and in the status file)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["start", "ready", "exit", "ladder", "restart", "give_up", "stop"]


@dataclass(frozen=True)
class SupervisorEvent:
    """One thing that happened: a start, ready, exit, ladder step, restart, give-up or stop."""

    kind: EventKind
    attempt: int
    detail: str = ""
    delay_s: float | None = None
    failure: dict[str, Any] | None = None
    at: float = field(default_factory=time.time)
