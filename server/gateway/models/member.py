"""One model of the pool: its state (unloaded, loading, resident, unloading), its backend while it holds
memory, its requests in flight and when it was last used.

How a backend kind serves one model is a `ModelKind`: its planned memory and a fresh backend. The embedded
engine's kind lives here; llama-server's (a supervised process per model) is built by the CLI, where launch
and gateway meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal, Protocol

from server.gateway.backends.base import Backend
from server.gateway.models.memory_plan import Where, embedded_planned_bytes
from server.gateway.models.models_file import ModelEntry

log = logging.getLogger(__name__)

ModelState = Literal["unloaded", "loading", "resident", "unloading"]
MODEL_STATES: tuple[ModelState, ...] = ("unloaded", "loading", "resident", "unloading")


class ModelKind(Protocol):
    """How one backend kind serves a model of the models file."""

    def planned_bytes(self, entry: ModelEntry, where: Where) -> int: ...

    def make_backend(self, entry: ModelEntry) -> Backend: ...


class EmbeddedKind:
    """The embedded engine: its core is a child process, so stopping it gives all its memory back."""

    def planned_bytes(self, entry: ModelEntry, where: Where) -> int:
        return embedded_planned_bytes(entry, where)

    def make_backend(self, entry: ModelEntry) -> Backend:
        from server.gateway.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(entry.engine_config(), model_id=entry.name)


class Member:
    """A model's life in the pool. Changed on the event loop only."""

    def __init__(self, entry: ModelEntry, kind: ModelKind, planned_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.entry = entry
        self.kind = kind
        self.planned_bytes = planned_bytes
        self.state: ModelState = "unloaded"
        self.backend: Backend | None = None
        self.in_flight = 0
        self.last_used = 0.0
        self.load_error: str | None = None
        self.loads = 0
        self.failed_loads = 0
        self.load_seconds_last: float | None = None
        self._clock = clock
        self._changed = asyncio.Event()  # set when a load or an unload ends

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def is_resident(self) -> bool:
        return self.state == "resident" and self.backend is not None and self.backend.is_ready()

    @property
    def holds_memory(self) -> bool:
        return self.state != "unloaded"

    def touch(self) -> None:
        self.last_used = self._clock()

    async def load(self) -> float:
        """Start a fresh backend; the seconds it took. On failure the model is unloaded again and raises."""
        self.state = "loading"
        self.load_error = None
        self._changed.clear()
        started = self._clock()
        backend = self.kind.make_backend(self.entry)
        try:
            await backend.start()
        except BaseException as exc:
            self.load_error = str(exc) or type(exc).__name__
            self.failed_loads += 1
            self.state = "unloaded"
            self._changed.set()
            try:
                await backend.stop()
            except Exception:
                log.exception("model %s: the backend that failed to load did not stop cleanly", self.name)
            raise
        if hasattr(backend, "on_fatal"):
            # A core that died for good ends this model, not the gateway: the next request loads it again.
            backend.on_fatal = self._died
        self.backend = backend
        self.state = "resident"
        self.loads += 1
        self.touch()
        self.load_seconds_last = self._clock() - started
        self._changed.set()
        return self.load_seconds_last

    def _died(self, reason: str) -> None:
        log.error("model %s: its backend failed for good (%s); it will load again on the next request",
                  self.name, reason)
        self.load_error = reason
        backend, self.backend = self.backend, None
        self.state = "unloaded"
        if backend is not None:
            asyncio.get_running_loop().create_task(backend.stop())

    async def unload(self) -> None:
        """Stop the backend and give its memory back (the caller made sure nothing runs on it)."""
        backend, self.backend = self.backend, None
        self.state = "unloading"
        self._changed.clear()
        try:
            if backend is not None:
                await backend.stop()
        finally:
            self.state = "unloaded"
            self._changed.set()

    async def wait_changed(self, timeout_s: float) -> None:
        """Until the load or unload under way ends, at most timeout_s."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
