"""What `edgeserve launch` runs: the backend under its supervisor, and a gateway in front if it needs one.

In front of llama-server or SGLang, edgeserve's gateway runs under a supervisor of its own.

The gateway starts once the backend is healthy (until then it would only answer 503). A stop (SIGTERM,
SIGINT) goes to the gateway first and waits for its drain (its grace period, then its streams end properly),
then to the backend; nothing is killed while it still has clients. Either supervisor giving up ends the stack
with exit status 1.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from server.launch.front import stop_timeout_s
from server.launch.plan import LaunchPlan
from server.launch.supervisor import Supervisor, SupervisorConfig

log = logging.getLogger(__name__)


def gateway_status_path(status_path: Path | None) -> Path | None:
    return status_path.with_name(status_path.stem + ".gateway.json") if status_path else None


class Stack:
    def __init__(self, backend: LaunchPlan, front: LaunchPlan | None, config: SupervisorConfig, *,
                 status_path: Path | None = None) -> None:
        backend_config = dataclasses.replace(config, stop_timeout_s=stop_timeout_s(backend))
        self.backend = Supervisor(backend, backend_config, status_path=status_path)
        self.front = None if front is None else Supervisor(
            front, dataclasses.replace(config, use_ladder=False, stop_timeout_s=stop_timeout_s(front),
                                       memory_limit_bytes=None),
            status_path=gateway_status_path(status_path), log_prefix="[gateway]")
        self._stop = threading.Event()

    @property
    def supervisors(self) -> tuple[Supervisor, ...]:
        return (self.backend,) if self.front is None else (self.backend, self.front)

    def start(self) -> bool:
        """Start the backend, then (once it is healthy) the gateway. False if either gave up first."""
        self.backend.start()
        if self.front is None:
            return True
        while not self._stop.is_set():
            if self.backend.wait_ready(0.2):
                self.front.start()
                return True
            if self.backend.wait(0):
                return False
        return False

    def stop(self) -> None:
        """The gateway first (it drains), then the backend; idempotent."""
        self._stop.set()
        if self.front is not None:
            self.front.stop()
        self.backend.stop()

    def failed(self) -> bool:
        return any(s.state == "failed" for s in self.supervisors)

    def run(self) -> int:
        """Run in the foreground until a signal (exit status 0) or a supervisor gives up (1)."""
        handlers: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, lambda *_: self._stop.set())
        try:
            if self.start():
                while not self._stop.wait(0.2):
                    if any(s.wait(0) for s in self.supervisors):
                        break
        finally:
            self.stop()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return 1 if self.failed() else 0

    def status(self) -> dict[str, Any]:
        out = self.backend.status()
        if self.front is not None:
            out["gateway"] = self.front.status()
        return out
