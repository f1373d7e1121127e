"""The front's end of the engine core: start it, send it messages, read what it sends, stop it.

The core runs in a process of its own (`process`: the step loop never shares an interpreter, a GIL or a
crash with the gateway) or, for unit tests that want no second interpreter, in a thread of this one
(`thread`). Either way it is the same code on the same two pipes, pickled the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

from server.engine.config import EngineConfig
from server.engine.core_proc import PICKLE_PROTOCOL, serve
from server.engine.errors import DoesNotFitError, ModelLoadError
from server.engine.protocol import CoreFailed, CoreReady, Shutdown, ToCore, ToFront

log = logging.getLogger(__name__)

CoreMode = Literal["process", "thread"]
# How long a stopping core gets to fail its requests and free llama.cpp before it is killed.
STOP_TIMEOUT_S = 10.0


class CoreGoneError(RuntimeError):
    """The core is not there to take a message (it died, or was stopped)."""


class CoreClient:
    """One running core and the two pipes to it. `read` and `send` are called from one thread at a time."""

    def __init__(self, config: EngineConfig, mode: CoreMode) -> None:
        self.config = config
        self.mode = mode
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._rx: Connection | None = None
        self._tx: Connection | None = None
        self._send_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the core; it loads the model and then sends CoreReady (or CoreFailed)."""
        core_in, front_out = os.pipe()
        front_in, core_out = os.pipe()
        if self.mode == "process":
            package_root = str(Path(__file__).resolve().parents[2])
            # The core imports edgeserve from where this front did, whatever the working directory.
            path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
            env = {**os.environ, "PYTHONPATH": path}
            # The engine's own fields only: a chain member extends EngineConfig with its own.
            config = self.config.model_dump_json(include=set(EngineConfig.model_fields))
            argv = [sys.executable, "-m", "server.engine.core_proc", "--config", config,
                    "--in-fd", str(core_in), "--out-fd", str(core_out),
                    "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel())]
            self._proc = subprocess.Popen(argv, pass_fds=(core_in, core_out), env=env)
            os.close(core_in)
            os.close(core_out)
        else:
            self._thread = threading.Thread(target=_serve_in_thread, args=(self.config, core_in, core_out),
                                            name="edgeserve-engine-core", daemon=True)
            self._thread.start()
        self._rx = Connection(front_in, writable=False)
        self._tx = Connection(front_out, readable=False)

    def wait_ready(self) -> CoreReady:
        """Block until the core has loaded: its facts, or ModelLoadError / DoesNotFitError with its reason."""
        while True:
            try:
                msg = self.read_blocking()
            except EOFError:
                why = self.exit_description()
                raise ModelLoadError(f"the engine core exited while loading ({why})") from None
            if isinstance(msg, CoreReady):
                return msg
            if isinstance(msg, CoreFailed):
                raise (DoesNotFitError if msg.kind == "does_not_fit" else ModelLoadError)(msg.message)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask the core to stop, wait for it (kill a process that does not stop), close the pipes."""
        with contextlib.suppress(CoreGoneError):
            self.send(Shutdown())
        if self._proc is not None:
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the engine core did not stop within %.0f s: killing it", timeout_s)
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.close()

    def close(self) -> None:
        for conn in (self._rx, self._tx):
            if conn is not None:
                conn.close()
        self._rx = self._tx = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def exit_description(self) -> str:
        if self._proc is None:
            return "in-process core"
        code = self._proc.poll()
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    # --- messages -------------------------------------------------------------------------------------------

    def fileno(self) -> int:
        assert self._rx is not None
        return self._rx.fileno()

    def send(self, msg: ToCore | tuple[ToCore, ...]) -> None:
        """One message, or several in one write (the core takes them in together)."""
        data = pickle.dumps(msg, protocol=PICKLE_PROTOCOL)
        with self._send_lock:
            if self._tx is None:
                raise CoreGoneError("the engine core is stopped")
            try:
                self._tx.send_bytes(data)
            except (BrokenPipeError, OSError) as exc:
                raise CoreGoneError(f"the engine core is gone ({self.exit_description()})") from exc

    def read_blocking(self) -> ToFront:
        """The next message (EOFError: the core is gone)."""
        if self._rx is None:
            raise EOFError
        return pickle.loads(self._rx.recv_bytes())  # type: ignore[no-any-return]

    def read_ready(self) -> list[ToFront]:
        """The messages that have arrived, without waiting (EOFError: the core is gone, after these)."""
        rx = self._rx
        if rx is None:
            raise EOFError
        out: list[ToFront] = []
        while rx.poll():
            try:
                out.append(pickle.loads(rx.recv_bytes()))
            except EOFError:
                if out:
                    return out  # the end comes on the next read, once these are handled
                raise
        return out


def _serve_in_thread(config: EngineConfig, fd_in: int, fd_out: int) -> None:
    conn_in = Connection(fd_in, writable=False)
    conn_out = Connection(fd_out, readable=False)
    try:
        serve(config, conn_in, conn_out)
    finally:
        conn_in.close()
        conn_out.close()
