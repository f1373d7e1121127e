"""A backend as a member of the fallback chain: its breaker, its own bounded queue, and why it failed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.chat_template import ChatTemplate
from server.gateway.admission import Admission
from server.gateway.backends.base import Backend, BackendError, BackendUnavailableError
from server.gateway.breaker import CircuitBreaker
from server.gateway.chain_config import MemberConfig
from server.hardware.oom import find_oom


@dataclass
class Member:
    """One backend of the chain with its breaker and its own bounded queue."""

    config: MemberConfig
    backend: Backend
    breaker: CircuitBreaker
    gate: Admission
    is_started: bool = False
    start_error: str | None = None
    template: ChatTemplate | None = None
    _template_tried: bool = field(default=False, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def n_ctx(self) -> int:
        """Context per sequence; 0 when unknown (a remote that reports none and has no n_ctx configured)."""
        return self.backend.n_ctx or self.config.n_ctx_given or 0

    def is_up(self) -> bool:
        return self.is_started and self.backend.is_ready()

    def is_available(self) -> bool:
        return self.is_up() and self.breaker.can_try()

    def has_room(self, *, is_failover: bool) -> bool:
        """A new request may queue up to queue_size; one moving over from a failed backend was already
        accepted by the gateway and may wait beyond it (the gate's hard bound: the whole chain's capacity)."""
        snap = self.gate.snapshot()
        bound = snap.max_queue if is_failover else self.config.queue_size
        return snap.in_flight < snap.limit or snap.waiting < bound

    def state(self) -> str:
        """For /ready: up, down, or out for good with the reason it did not start."""
        if self.start_error:
            return f"out: {self.start_error}"
        return "up" if self.is_available() else "down"

    def has_free_slot(self) -> bool:
        snap = self.gate.snapshot()
        return snap.in_flight < snap.limit and snap.waiting == 0


def describe(members: Sequence[Member], exclude: set[str]) -> str:
    """Why no member can take a request, one clause per member (for the 503's message)."""
    parts = []
    for m in members:
        if m.name in exclude:
            why = "failed on this request"
        elif m.start_error:
            why = f"did not start ({m.start_error[:120]})"
        elif not m.is_up():
            why = "down"
        else:
            why = f"breaker {m.breaker.state}, probe in {m.breaker.seconds_until_probe():.1f} s"
        parts.append(f"{m.name}: {why}")
    return "; ".join(parts)


def failure_reason(exc: BaseException) -> str:
    """A short label for metrics: oom, unavailable, stall, error."""
    if isinstance(exc, BackendError) and find_oom([exc.message])[0] is not None:
        return "oom"
    if isinstance(exc, StallError):
        return "stall"
    if isinstance(exc, BackendUnavailableError):
        return "unavailable"
    return "error"


class StallError(BackendUnavailableError):
    """A backend sent nothing for `stall_timeout_s`: treated as gone."""

    code = "backend_stalled"
