"""The tuner's side effects: start a server for one setting on a free loopback port, load it, stop it.

Each trial runs in its own folder: server.log, locust.log, Locust's CSVs, summary.json, a /metrics snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

from loadtest.selection import Setting, Trial
from loadtest.servers import free_port
from loadtest.summary import LoadSummary
from loadtest.workload import Workload

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# `edgeserve serve` run as `python -m server.cli.serve` by the interpreter running the tuner: no console
# script needed on PATH, and only the serve command's modules are imported.
DEFAULT_SERVER_TEMPLATE: tuple[str, ...] = (
    "{python}", "-m", "server.cli.serve", "--host", "{host}", "--port", "{port}",
    "--n-parallel", "{n_parallel}", "--n-ctx", "{n_ctx}", "--log-level", "warning",
)
# {n_ctx} is one sequence's context; llama-server's -c takes {n_ctx_total} (n_ctx x n_parallel).
PLACEHOLDERS = ("python", "host", "port", "n_parallel", "n_ctx", "n_ctx_total", "model")
LOG_TAIL_CHARS = 1500


class TrialError(RuntimeError):
    """A server that would not start or a Locust run that produced no summary; the message says why."""


class RunConfig(BaseModel):
    """How every trial of a sweep runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server_template: tuple[str, ...] = DEFAULT_SERVER_TEMPLATE
    model: Path | None = Field(default=None, description="passed as --model unless the template has {model}")
    host: str = "127.0.0.1"
    ready_path: str = Field(default="/ready", description="200 here means the server takes requests")
    ready_timeout_s: float = Field(default=300.0, gt=0)
    users: int = Field(ge=1, description="concurrent Locust users, the same for every setting")
    duration_s: int = Field(ge=1, le=86_400)
    workload: Workload = Workload()
    warmup_requests: int = Field(default=1, ge=0, description="sent before Locust starts, not measured")
    drain_s: int = Field(default=60, ge=0, description="time in-flight requests get to finish after the run")
    out_dir: Path


def render_command(template: Sequence[str], setting: Setting, *, host: str, port: int,
                   model: Path | None, python: str = sys.executable) -> list[str]:
    """The server's argv for one setting; the PLACEHOLDERS ({python} {host} {port} {n_parallel} {n_ctx}
    {n_ctx_total} {model}) are filled in."""
    values = {"python": python, "host": host, "port": str(port), "n_parallel": str(setting.n_parallel),
              "n_ctx": str(setting.n_ctx), "n_ctx_total": str(setting.n_ctx_total),
              "model": str(model) if model is not None else ""}
    argv: list[str] = []
    uses_model = False
    for part in template:
        uses_model = uses_model or "{model}" in part
        try:
            argv.append(part.format_map(values))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad placeholder in server command {part!r}; known: "
                             + ", ".join("{" + p + "}" for p in PLACEHOLDERS)) from exc
    if uses_model and model is None:
        raise ValueError("the server command uses {model}: give --model")
    if model is not None and not uses_model:
        argv += ["--model", str(model)]
    if not argv:
        raise ValueError("empty server command")
    return argv


def _tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-LOG_TAIL_CHARS:].strip()


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group (it may have children, e.g. llama-server), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


@contextlib.contextmanager
def running_server(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
                   ) -> Iterator[subprocess.Popen[bytes]]:
    """Start the server in its own session, logging to `log_path`; always stopped on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        try:
            proc = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                                    start_new_session=True)
        except OSError as exc:
            raise TrialError(f"could not start {argv[0]}: {exc}") from exc
        try:
            yield proc
        finally:
            _stop(proc)


def wait_ready(base_url: str, ready_path: str, proc: subprocess.Popen[bytes], timeout_s: float,
               log_path: Path) -> float:
    """Poll until `ready_path` answers 200; returns the seconds it took. Fails early if the server exits."""
    started = time.monotonic()
    with httpx.Client(timeout=5.0) as client:
        while True:
            code = proc.poll()
            if code is not None:
                raise TrialError(f"server exited with status {code} before it was ready:\n{_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(base_url + ready_path).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise TrialError(f"server not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.25)


def warm_up(base_url: str, workload: Workload, count: int) -> None:
    """A few short requests so first-request costs (allocation, graph setup) stay out of the measurement."""
    headers = {"Authorization": f"Bearer {workload.api_key}"} if workload.api_key else {}
    body: dict[str, object] = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    if workload.model:
        body["model"] = workload.model
    with httpx.Client(timeout=workload.request_timeout_s) as client:
        for _ in range(count):
            resp = client.post(base_url + "/v1/chat/completions", json=body, headers=headers)
            if resp.status_code != 200:
                raise TrialError(f"warm-up request failed: HTTP {resp.status_code} {resp.text[:300]}")


def run_locust(base_url: str, *, users: int, duration_s: int, workload: Workload, trial_dir: Path,
               drain_s: int = 60, timeout_s: float | None = None) -> LoadSummary:
    """Run Locust headless against `base_url` for `duration_s` seconds; returns the locustfile's summary.

    Requests still running at the end get `drain_s` seconds to finish, so slow requests show up in the
    latency figures instead of vanishing; throughput counts only the tokens of the measured window.
    """
    trial_dir.mkdir(parents=True, exist_ok=True)
    summary_path = trial_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    env = {**os.environ, **workload.model_copy(update={"summary_path": str(summary_path)}).to_env()}
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
            "-r", str(users), "-t", f"{duration_s}s", "--host", base_url, "--csv", str(trial_dir / "locust"),
            "--stop-timeout", str(drain_s), "--only-summary", "--loglevel", "WARNING",
            "--exit-code-on-error", "0"]
    log_path = trial_dir / "locust.log"
    limit = timeout_s if timeout_s is not None else duration_s + drain_s + 120.0
    with log_path.open("wb") as log_file:
        try:
            proc = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=env, timeout=limit, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TrialError(f"Locust did not finish within {limit:.0f} s:\n{_tail(log_path)}") from exc
    if proc.returncode != 0 or not summary_path.is_file():
        raise TrialError(f"Locust exited with status {proc.returncode} and no summary:\n{_tail(log_path)}")
    return LoadSummary.read(summary_path)


def gpu_memory_used_bytes(metrics_text: str) -> int | None:
    """Sum of edgeserve_gpu_memory_used_bytes over GPUs in a /metrics page; None when there is none."""
    total = 0.0
    seen = False
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "edgeserve_gpu_memory_used_bytes":
            for sample in family.samples:
                total += sample.value
                seen = True
    return int(total) if seen else None


def _snapshot_metrics(base_url: str, trial_dir: Path) -> int | None:
    try:
        resp = httpx.get(base_url + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    (trial_dir / "metrics.prom").write_text(resp.text, encoding="utf-8")
    try:
        return gpu_memory_used_bytes(resp.text)
    except ValueError:  # not Prometheus text (another server's /metrics)
        return None


def run_trial(setting: Setting, config: RunConfig) -> Trial:
    """Start a server with `setting`, load it, stop it. A failure becomes a Trial with its reason."""
    trial_dir = config.out_dir / f"p{setting.n_parallel}_c{setting.n_ctx}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    port = free_port(config.host)
    base_url = f"http://{config.host}:{port}"
    argv = render_command(config.server_template, setting, host=config.host, port=port, model=config.model)
    (trial_dir / "server_command.txt").write_text(" ".join(argv) + "\n", encoding="utf-8")
    log_path = trial_dir / "server.log"
    # Other work on the same cores distorts every figure: record how busy the host was.
    load_1m = os.getloadavg()[0]
    log.info("%s: starting %s (load average %.2f)", setting.label, " ".join(argv), load_1m)
    try:
        with running_server(argv, log_path) as proc:
            ready_s = wait_ready(base_url, config.ready_path, proc, config.ready_timeout_s, log_path)
            log.info("%s: ready in %.1f s; warming up", setting.label, ready_s)
            warm_up(base_url, config.workload, config.warmup_requests)
            log.info("%s: %d users for %d s", setting.label, config.users, config.duration_s)
            summary = run_locust(base_url, users=config.users, duration_s=config.duration_s,
                                 workload=config.workload, trial_dir=trial_dir, drain_s=config.drain_s)
            memory = _snapshot_metrics(base_url, trial_dir)
    except (TrialError, httpx.HTTPError) as exc:
        log.warning("%s: %s", setting.label, exc)
        return Trial(setting=setting, users=config.users, failure=str(exc) or type(exc).__name__,
                     host_load_1m=load_1m)
    return Trial(setting=setting, users=config.users, summary=summary, gpu_memory_used_bytes=memory,
                 host_load_1m=load_1m)
