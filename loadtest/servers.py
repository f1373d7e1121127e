"""Servers on 127.0.0.1 for benchmarks and tests: edgeserve's gateway and llama-cpp-python's server.

The gateway runs with one backend or a fallback chain; llama-cpp-python's own server is the "remote" llama.cpp
backend and the baseline edgeserve is compared with.

Every wait is bounded; every process is stopped by its own pid when done. The Prometheus text helpers read
what the servers report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A server we started; `url` is its base URL."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    name: str
    started_at: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, path: str = "/ready", timeout_s: float = 180.0) -> ServerProcess:
        """wait_http, or stop the server and raise with the tail of its log."""
        if not self.wait_http(path, timeout_s):
            tail = "\n".join(self.log_tail())
            self.stop()
            raise RuntimeError(f"{self.name} not ready on {path} within {timeout_s:.0f} s:\n{tail}")
        return self

    def wait_http(self, path: str, timeout_s: float, want: int = 200) -> bool:
        """Poll `path` until it answers `want` (True), the process dies or the time is up (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_alive():
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2.0).status_code == want:
                    return True
            time.sleep(0.2)
        return False

    def wait_exit(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill9(self) -> None:
        if self.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.is_alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log_tail(self, lines: int = 40) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def rss_kib(self) -> int:
        """Resident memory of the process (VmRSS from /proc/<pid>/status), KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.proc.pid}")


def spawn(cmd: list[str], log_path: Path, port: int, name: str, env: Mapping[str, str] | None = None
           ) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The repository first, then whatever the caller had (the GPU host brings its packages that way).
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=full_env,
                                start_new_session=True)
    return ServerProcess(proc=proc, port=port, log_path=log_path, name=name)


def start_llama_cpp_server(model: Path, port: int, log_path: Path, *, n_ctx: int = 1024,
                           n_threads: int = 1) -> ServerProcess:
    """llama-cpp-python's server on 127.0.0.1:port (not waited for: call wait_http("/v1/models", ...))."""
    cmd = [sys.executable, "-m", "server.launch.llama_cpp_python", "--model", str(model),
           "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
           "--n_threads_batch", str(n_threads),
           # Its default cuts the running stream short whenever another request arrives: not what we test.
           "--interrupt_requests", "False"]
    return spawn(cmd, log_path, port, "llama_cpp.server")


def write_chain(path: Path, backends: list[dict[str, Any]], model_name: str = "smollm2") -> Path:
    path.write_text(yaml.safe_dump({"model_name": model_name, "backends": backends}, sort_keys=False))
    return path


def start_edgeserve(args: Sequence[str], log_path: Path, *, port: int | None = None,
                    env: Mapping[str, str] | None = None) -> ServerProcess:
    """`edgeserve serve ARGS` on 127.0.0.1 (not waited for: call wait_ready())."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "server.cli.serve", "--port", str(port), "--log-level", "warning", *args]
    return spawn(cmd, log_path, port, "edgeserve serve", env)


def start_gateway(chain_file: Path, port: int, log_path: Path, *, api_key: str | None = None,
                  env: Mapping[str, str] | None = None) -> ServerProcess:
    """The gateway (uvicorn over create_app, settings from EDGESERVE_*) with the chain in `chain_file`.

    Not waited for: call wait_http("/ready", ...)."""
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "server.gateway.app:app_from_env",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    extra = {"EDGESERVE_CHAIN_CONFIG": str(chain_file), "EDGESERVE_ENABLE_GPU_METRICS": "false",
             **(env or {})}
    if api_key:
        extra["EDGESERVE_API_KEY"] = api_key
    return spawn(cmd, log_path, port, "gateway", extra)


def metric_values(url: str) -> dict[str, float]:
    """Every sample of GET /metrics as {'name{labels}': value}."""
    samples: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
    return samples


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        yield server
    finally:
        server.stop()
