"""Real servers on 127.0.0.1 for the gateway tests: `edgeserve serve` and llama-cpp-python's server.

One embedded server is shared by every test module of the session (the model loads once), stopped at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# Room for 8 concurrent sequences of a few hundred tokens, small enough to load fast on 2 cores.
EMBEDDED_PARALLEL = 8
EMBEDDED_CTX = 8192  # 1024 tokens per sequence (llama-server semantics: -c split over -np)
# llama-cpp-python's own server, as `python -m` arguments (see server/launch/llama_cpp_python.py).
LLAMA_CPP_SERVER = ["-m", "server.launch.llama_cpp_python"]




def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server subprocess with its log in a temporary file; `url` is its base URL."""

    def __init__(
        self, args: list[str], port: int, ready_path: str = "/ready", env: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        # The log file lives as long as the server, so no context manager.
        self._log = tempfile.NamedTemporaryFile(prefix="edgeserve-test-", suffix=".log", delete=False)  # noqa: SIM115
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self._wait(ready_path)

    def log_tail(self, n_chars: int = 4000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-n_chars:]

    def _wait(self, ready_path: str, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + ready_path, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"server not ready within {timeout_s:.0f} s:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self._log.close()
            os.unlink(self._log.name)


def edgeserve(*args: str, ready_path: str = "/ready", env: dict[str, str] | None = None) -> ServerProcess:
    """Start `edgeserve serve ARGS --port <free>` and wait until `ready_path` answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli.serve", "--port", str(port), "--log-level", "warning", *args]
    return ServerProcess(cmd, port, ready_path=ready_path, env=env)


@functools.cache
def shared_embedded_server() -> ServerProcess:
    """The session's embedded server over the bundled SmolLM2 (started on first use)."""
    # One engine thread: with as many threads as cores, llama.cpp's spinning workers collapse whenever the
    # test process or anything else wants a core too (measured on 2 cores: 3 instead of 25 tokens/s).
    server = edgeserve("--parallel", str(EMBEDDED_PARALLEL), "--ctx", str(EMBEDDED_CTX), "--threads", "1")
    atexit.register(server.stop)
    return server


def metric_values(url: str) -> dict[str, float]:
    """Every sample of GET /metrics as {'name{labels}': value}."""
    samples: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
    return samples
