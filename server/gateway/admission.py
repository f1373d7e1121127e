"""Admission control: at most `limit` requests in flight, a bounded FIFO queue behind them, nothing beyond.

Requests past the queue are refused at once (the gateway answers 429 with Retry-After) instead of piling up
latency nobody will wait for; the openai SDK retries such answers on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass


class QueueFullError(Exception):
    """Every slot is busy and the queue is full."""


class QueueTimeoutError(Exception):
    """The request waited its whole allowance for a slot."""


@dataclass(frozen=True)
class AdmissionSnapshot:
    in_flight: int
    waiting: int
    limit: int
    max_queue: int


class Lease:
    """One admitted request's slot. `release()` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    @property
    def is_released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release()


class Admission:
    """A fair (FIFO) counting gate with a bounded waiting line."""

    def __init__(self, limit: int, max_queue: int) -> None:
        if limit < 1:
            raise ValueError("admission limit must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.limit = limit
        self.max_queue = max_queue
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        # list() copies the deque in one step under the GIL: /metrics reads this from a worker thread.
        return sum(1 for w in list(self._waiters) if not w.done())

    def snapshot(self) -> AdmissionSnapshot:
        return AdmissionSnapshot(self._in_flight, self.waiting, self.limit, self.max_queue)

    async def acquire(self, timeout_s: float | None = None, *, first: bool = False) -> Lease:
        """Wait for a slot. QueueFullError at once when the queue is full; QueueTimeoutError on timeout.

        `first` puts the caller at the head of the line (a stream resumed mid-way: its client is waiting)."""
        if self._in_flight < self.limit and (first or not self.waiting):
            self._in_flight += 1
            return Lease(self)
        if self.waiting >= self.max_queue:
            raise QueueFullError(f"{self._in_flight} requests running and {self.waiting} queued")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we gave up: pass it on, do not leak it.
                self._release()
            else:
                waiter.cancel()
            self._discard(waiter)
            if isinstance(exc, asyncio.TimeoutError):
                raise QueueTimeoutError(f"no slot free within {timeout_s:g} s") from None
            raise
        self._discard(waiter)
        return Lease(self)

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _release(self) -> None:
        # Hand the slot straight to the oldest live waiter: in_flight never dips, no newcomer jumps the line.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_flight -= 1
