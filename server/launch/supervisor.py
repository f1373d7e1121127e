"""Supervisor: run a LaunchPlan, wait for health, restart on crash with backoff, step down the OOM ladder.

Lifecycle of one attempt: start the backend in its own process group -> poll its health URL until 200
(llama-server answers 503 while loading; SGLang /health; the gateway /ready) -> watch it. When it dies:
- out of memory before it became healthy: the next plan from `ladder.next_step` starts at once (no
  backoff: the memory is free again as soon as the process is gone); no rung left -> give up;
- a load error (missing or damaged model) before it became healthy: give up, a restart cannot fix it;
- anything else: restart the same plan after 1, 2, 4, ... seconds (capped); after `max_restarts` failures in a
  row give up. A run that stayed up `stable_after_s` resets the count.
Stop (Ctrl-C, SIGTERM, `stop()`): SIGTERM to the whole group, SIGKILL after a grace period; no orphans.
State is exposed as properties, an `on_event` callback and, if asked, a JSON status file rewritten atomically
on every change (what the gateway or an operator reads to see the ladder step taken).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from server.hardware.oom import Failure, classify
from server.launch import ladder
from server.launch.events import EventKind, SupervisorEvent
from server.launch.plan import LaunchPlan
from server.launch.process import BackendProcess

log = logging.getLogger(__name__)
backend_log = logging.getLogger("edgeserve.backend")

State = Literal["idle", "starting", "ready", "backoff", "stopping", "stopped", "failed"]
NextStep = Callable[[LaunchPlan, Failure], LaunchPlan | None]


@dataclass(frozen=True)
class SupervisorConfig:
    """Timing and policy; the defaults suit a real backend (tests shrink the delays)."""

    use_ladder: bool = True
    max_restarts: int = 5
    backoff_initial_s: float = 1.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0
    health_timeout_s: float = 900.0
    health_interval_s: float = 0.5
    stop_timeout_s: float = 15.0
    memory_limit_bytes: int | None = None
    available_bytes: int | None = None

    def backoff_s(self, failures_in_row: int) -> float:
        """Delay before restart number `failures_in_row` (1-based): initial * factor^(n-1), capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * self.backoff_factor ** (failures_in_row - 1))


class Supervisor:
    """Keeps one backend alive. Use `start()` + `wait_ready()` + `stop()`, or `run()` to block until a
    signal."""

    def __init__(
        self,
        plan: LaunchPlan,
        config: SupervisorConfig | None = None,
        *,
        status_path: Path | None = None,
        on_event: Callable[[SupervisorEvent], None] | None = None,
        log_prefix: str | None = None,
        on_line: Callable[[str], None] | None = None,
        next_step: NextStep = ladder.next_step,
    ) -> None:
        self.config = config or SupervisorConfig()
        self._plan = plan
        self._initial_plan = plan
        self._status_path = status_path
        self._on_event = on_event
        self._prefix = log_prefix or f"[{plan.backend}]"
        self._next_step = next_step
        self._on_line = on_line
        self._state: State = "idle"
        self._events: list[SupervisorEvent] = []
        self._restarts = 0
        self._attempt = 0
        self._last_failure: Failure | None = None
        self._fatal_lines: list[str] = []
        self._proc: BackendProcess | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what others read ----------------------------------------------------------------------------------

    @property
    def plan(self) -> LaunchPlan:
        """The plan running now (after any ladder steps)."""
        return self._plan

    @property
    def state(self) -> State:
        return self._state

    @property
    def steps(self) -> tuple[Any, ...]:
        """OOM ladder steps taken since the first plan (StepTaken values)."""
        return self._plan.ladder

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def events(self) -> tuple[SupervisorEvent, ...]:
        with self._lock:
            return tuple(self._events)

    @property
    def last_failure(self) -> Failure | None:
        return self._last_failure

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_ready(self) -> bool:
        return self._state == "ready"

    def status(self) -> dict[str, Any]:
        """What the status file holds: state, pid, restarts, ladder steps, the current plan, the last
        failure."""
        plan = self._plan
        return {
            "state": self._state,
            "backend": plan.backend,
            "pid": self.pid,
            "attempt": self._attempt,
            "restarts": self._restarts,
            "health_url": plan.health_url,
            "ladder_steps": [s.model_dump(mode="json") for s in plan.ladder],
            "last_failure": self._last_failure.model_dump(mode="json") if self._last_failure else None,
            "plan": _masked({k: v for k, v in plan.to_json_dict().items() if k != "reasons"}, plan.api_key),
            "updated_at": time.time(),
        }

    # ---- control -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start supervising in a background thread (returns at once)."""
        if self._thread is not None:
            raise RuntimeError("supervisor already started")
        self._thread = threading.Thread(target=self._loop, name="edgeserve-supervisor", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the backend is healthy (True) or the supervisor gave up / timed out (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ready.is_set() and self._state == "ready":
                return True
            if self._done.is_set():
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._ready.wait(0.1 if left is None else min(0.1, left))

    def stop(self) -> None:
        """Stop the backend (the whole process group) and the supervisor; idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.config.stop_timeout_s * 2 + 5)
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.stop(self.config.stop_timeout_s)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the supervisor is done (stopped or gave up)."""
        return self._done.wait(timeout)

    def run(self) -> int:
        """Supervise in the foreground until Ctrl-C / SIGTERM (exit code 0) or giving up (1)."""
        handlers: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, lambda *_: self._stop.set())
        try:
            self.start()
            while not self._done.wait(0.2):
                pass
        finally:
            self.stop()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return 1 if self._state == "failed" else 0

    # ---- the loop ------------------------------------------------------------------------------------------

    def _emit(self, kind: EventKind, detail: str = "", **extra: Any) -> None:
        event = SupervisorEvent(kind=kind, attempt=self._attempt, detail=detail, **extra)
        with self._lock:
            self._events.append(event)
        log.info("%s %s: %s", self._prefix, kind, detail)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("supervisor event callback failed")
        self._write_status()

    def _set_state(self, state: State) -> None:
        self._state = state
        if state != "ready":
            self._ready.clear()
        self._write_status()

    def _write_status(self) -> None:
        if self._status_path is None:
            return
        path = self._status_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump(self.status(), fh, indent=2)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write supervisor status %s: %s", path, exc)

    def _sink(self, line: str) -> None:
        backend_log.info("%s %s", self._prefix, line)
        if self._on_line is not None:
            self._on_line(line)

    def _loop(self) -> None:
        failures_in_row = 0
        try:
            while not self._stop.is_set():
                self._attempt += 1
                plan = self._plan
                proc = BackendProcess(
                    plan.argv, plan.env, sink=self._sink, memory_limit_bytes=self.config.memory_limit_bytes
                )
                with self._lock:
                    self._proc = proc
                self._set_state("starting")
                try:
                    proc.start()
                except OSError as exc:
                    self._last_failure = Failure(kind="load_error", phase="startup", evidence=str(exc))
                    self._emit("give_up", f"cannot start {plan.argv[0]}: {exc}")
                    self._set_state("failed")
                    return
                self._emit("start", f"pid {proc.pid}: {plan.command_line()}")
                became_ready = self._wait_healthy(proc, plan)
                if self._stop.is_set():
                    break
                if became_ready:
                    self._set_state("ready")
                    self._ready.set()
                    self._emit("ready", plan.health_url)
                    while proc.poll() is None and not self._stop.wait(0.2):
                        pass
                    if self._stop.is_set():
                        break
                    if proc.started_at and time.monotonic() - proc.started_at >= self.config.stable_after_s:
                        failures_in_row = 0
                code = proc.wait(5.0)
                proc.drain()
                proc.reap_group()
                lines, self._fatal_lines = [*proc.tail(), *self._fatal_lines], []
                failure = classify(
                    lines,
                    code,
                    phase="running" if became_ready else "startup",
                    available_bytes=self.config.available_bytes,
                )
                self._last_failure = failure
                self._emit(
                    "exit",
                    f"{failure.kind} (exit {code}): {failure.evidence or ''}",
                    failure=failure.model_dump(mode="json"),
                )
                if not became_ready and failure.is_oom and self.config.use_ladder:
                    nxt = self._next_step(plan, failure)
                    if nxt is None:
                        self._emit("give_up", "out of memory and no ladder rung left")
                        self._set_state("failed")
                        return
                    self._plan = nxt
                    step = nxt.ladder[-1] if nxt.ladder else None
                    what = (
                        f"{step.rung}: {step.setting} {step.old} -> {step.new} ({step.why})" if step else ""
                    )
                    self._emit("ladder", what)
                    continue
                if not became_ready and failure.kind == "load_error":
                    self._emit("give_up", f"the backend cannot load: {failure.evidence}")
                    self._set_state("failed")
                    return
                failures_in_row += 1
                if failures_in_row > self.config.max_restarts:
                    # Said with the failure that kept coming back: a restart of the same plan cannot help.
                    self._emit("give_up", f"{failures_in_row - 1} restarts in a row failed, the last with "
                               f"{failure.kind} (exit {code}): {failure.evidence or 'no reason in its log'}")
                    self._set_state("failed")
                    return
                delay = self.config.backoff_s(failures_in_row)
                self._restarts += 1
                self._set_state("backoff")
                self._emit("restart", f"restart {self._restarts} in {delay:.2f}s", delay_s=delay)
                if self._stop.wait(delay):
                    break
            self._shutdown()
        except Exception:
            log.exception("%s supervisor failed", self._prefix)
            with self._lock:
                current = self._proc
            if current is not None and current.poll() is None:
                current.stop(self.config.stop_timeout_s)
            self._set_state("failed")
        finally:
            self._done.set()
            self._ready.set()

    def _shutdown(self) -> None:
        self._set_state("stopping")
        with self._lock:
            proc = self._proc
        if proc is not None:
            code = proc.stop(self.config.stop_timeout_s)
            self._emit("stop", f"backend stopped (exit {code})")
        self._set_state("stopped")

    def _wait_healthy(self, proc: BackendProcess, plan: LaunchPlan) -> bool:
        """Poll the health URL until 200 (True) or the process exits / the timeout passes (False)."""
        deadline = time.monotonic() + self.config.health_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while not self._stop.is_set():
                if proc.poll() is not None:
                    return False
                if not plan.health_url:
                    return True
                try:
                    reply = client.get(plan.health_url)
                    if reply.status_code == 200:
                        return True
                    fatal = _fatal_reason(reply)
                    if fatal:
                        # The gateway stays up after its model failed to load; the process is no use like
                        # that.
                        self._fatal_lines.append(fatal)
                        proc.stop(self.config.stop_timeout_s)
                        return False
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    log.warning(
                        "%s not healthy after %.0fs: stopping it", self._prefix, self.config.health_timeout_s
                    )
                    proc.stop(self.config.stop_timeout_s)
                    return False
                self._stop.wait(self.config.health_interval_s)
        return False


def _masked(data: dict[str, Any], secret: str | None) -> dict[str, Any]:
    """The status file outlives the process: keep the API key out of it."""
    if not secret:
        return data
    text = json.dumps(data).replace(secret, "***")
    return dict(json.loads(text))


def _fatal_reason(reply: httpx.Response) -> str | None:
    """The reason a backend gives for never becoming ready (the gateway's /ready: status "error")."""
    try:
        body = reply.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("status") == "error":
        return str(body.get("reason") or "the backend reports an error")
    return None
