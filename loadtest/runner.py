"""The tuner's side effects: each setting planned, started, warmed up, loaded, measured and stopped.

Each setting is planned by the launcher's own planner (the backend, argv and memory budget `edgeserve launch`
would use), started under the launcher's supervisor, warmed up, loaded with Locust at the load points
`search.sweep_rates` asks for, and its memory read before it stops.

Each setting runs in its own folder under the output: plan.json, server.log, and per load point Locust's CSVs,
its log and summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from loadtest.footprint import gpu_used_bytes, memory_in_use
from loadtest.search import sweep_rates
from loadtest.selection import Load, LoadPoint, Setting, Skipped, Slo, Trial
from loadtest.servers import free_port
from loadtest.summary import LoadSummary
from loadtest.workload import CHAT_PATH, TEMPLATE_TOKENS, Workload
from quantize.model.units import MIB
from server.hardware.target import Target, resolve_target
from server.launch.plan import LaunchPlan
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.resolve import health_url
from server.launch.supervisor import Supervisor, SupervisorConfig
from server.launch.toolchain import Toolchain, probe_toolchain

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOG_TAIL_CHARS = 1500
Progress = Callable[[str, bool], None]  # (what is happening, whether a Locust run just finished)


class TrialError(RuntimeError):
    """A server that would not start or a Locust run that produced no summary; the message says why."""


class BenchConfig(BaseModel):
    """How every setting of a tune runs: the launch request the settings are laid over, and the load."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request: LaunchRequest = LaunchRequest()
    workload: Workload = Workload()
    duration_s: int = Field(default=30, ge=1, le=86_400, description="seconds of load per load point")
    drain_s: int = Field(default=30, ge=0, description="time in-flight requests get to finish after a run")
    warmup_requests: int = Field(default=1, ge=0, description="sent before the first run, not measured")
    rate_steps: int = Field(default=3, ge=0, description="bisection rounds on the rate when the SLOs fail")
    ready_timeout_s: float = Field(default=600.0, gt=0)
    out_dir: Path


def _tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-LOG_TAIL_CHARS:].strip()


def _first_model(client: httpx.Client, base_url: str, headers: dict[str, str]) -> str:
    """The id to ask for when the workload names none: the first /v1/models lists (as the locustfile does)."""
    resp = client.get(base_url + "/v1/models", headers=headers)
    data = resp.json().get("data") if resp.status_code == 200 else None
    if not data or not isinstance(data[0].get("id"), str):
        raise TrialError(f"no model listed at {base_url}/v1/models: HTTP {resp.status_code} "
                         f"{resp.text[:300]}")
    return str(data[0]["id"])


def warm_up(base_url: str, workload: Workload, count: int) -> None:
    """A few short requests so first-request costs (allocation, graph setup) stay out of the measurement."""
    headers = {"Authorization": f"Bearer {workload.api_key}"} if workload.api_key else {}
    body: dict[str, object] = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    with httpx.Client(timeout=workload.request_timeout_s, trust_env=False) as client:
        body["model"] = workload.model or _first_model(client, base_url, headers)
        for _ in range(count):
            resp = client.post(base_url + CHAT_PATH, json=body, headers=headers)
            if resp.status_code != 200:
                raise TrialError(f"warm-up request failed: HTTP {resp.status_code} {resp.text[:300]}")


def run_locust(base_url: str, *, load: Load, duration_s: int, workload: Workload, trial_dir: Path,
               drain_s: int = 30, timeout_s: float | None = None) -> LoadSummary:
    """Run Locust headless against `base_url` with `load` for `duration_s` seconds; the locustfile's summary.

    Requests still running at the end get `drain_s` seconds to finish, so slow requests show up in the
    latency figures instead of vanishing; throughput counts only the tokens of the measured window.
    """
    trial_dir.mkdir(parents=True, exist_ok=True)
    summary_path = trial_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    paced = workload.model_copy(update={"summary_path": str(summary_path), "rate_rps": load.rate_rps})
    env = {**os.environ, **paced.to_env()}
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(load.users),
            "-r", str(load.users), "-t", f"{duration_s}s", "--host", base_url,
            "--csv", str(trial_dir / "locust"), "--stop-timeout", str(drain_s), "--only-summary",
            "--loglevel", "WARNING", "--exit-code-on-error", "0"]
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


def own_toolchain() -> Toolchain:
    """This machine's programs, with `edgeserve` being the one the tuner runs from (not another on PATH)."""
    return probe_toolchain().model_copy(update={"edgeserve": (sys.executable, "-m", "server.cli.app")})


def planned_values(plan: LaunchPlan) -> dict[str, int | None]:
    """The plan's values of the searched settings (SGLang's logical batch is its prefill chunk)."""
    batch = plan.n_batch if plan.n_batch is not None else plan.chunked_prefill_size
    return {"n_parallel": plan.n_parallel, "n_ctx": plan.n_ctx, "n_batch": batch, "n_ubatch": plan.n_ubatch}


class LaunchBench:
    """Plans, checks and measures settings the way `edgeserve launch` would run them; each once."""

    def __init__(self, config: BenchConfig, slo: Slo, *, target: Target | None = None,
                 toolchain: Toolchain | None = None, on_progress: Progress | None = None) -> None:
        self.config = config
        self.slo = slo
        request = config.request
        self.target = target or resolve_target(request.card, request.gpus)
        self.toolchain = toolchain or own_toolchain()
        self._progress = on_progress or (lambda _text, _done: None)
        self._trials: dict[Setting, Trial] = {}
        self._checks: dict[Setting, Skipped | None] = {}

    def plan(self, setting: Setting, port: int | None = None) -> LaunchPlan:
        """The launcher's plan with this setting pinned (as CLI flags would pin it)."""
        request = self.config.request.model_copy(update={**setting.values(), "port": port})
        return make_plan(request, toolchain=self.toolchain, target=self.target)

    def check(self, setting: Setting) -> Skipped | None:
        """Why `setting` cannot run here (None: it can): a request would not fit n_ctx, the VRAM calculator
        says it does not fit the card, or the planner would change it. Each setting is planned once (a large
        model's header takes a while to read, and the search and the grid ask about every setting)."""
        if setting not in self._checks:
            self._checks[setting] = self._check(setting)
        return self._checks[setting]

    def _check(self, setting: Setting) -> Skipped | None:
        workload = self.config.workload
        need = workload.request_tokens
        if need > setting.n_ctx:
            # Said with its parts and the way out: the defaults alone (1024 + 64) overflow --n-ctx 1024.
            return Skipped(setting=setting, why=(
                f"a request needs up to {need} tokens (--max-prompt-tokens {workload.max_prompt_tokens} + "
                f"{TEMPLATE_TOKENS} for the chat template + --max-tokens {workload.max_tokens}), a sequence "
                f"gets n_ctx {setting.n_ctx}: give a longer --n-ctx or lower --max-prompt-tokens"))
        try:
            plan = self.plan(setting)
        except ValueError as exc:  # PlanError: the backend refuses these values
            return Skipped(setting=setting, why=str(exc))
        predicted = plan.expected_total_bytes
        if plan.memory is not None and plan.memory.fits is False and plan.memory.capacity_bytes is not None:
            return Skipped(setting=setting, predicted_bytes=predicted,
                           why=f"needs {plan.memory.total_bytes / MIB:,.0f} MiB, over the "
                               f"{plan.memory.capacity_bytes / MIB:,.0f} MiB budget")
        changed = {k: v for k, v in planned_values(plan).items()
                   if v is not None and v != getattr(setting, k)}
        if changed:
            what = ", ".join(f"{k} {v}" for k, v in changed.items())
            return Skipped(setting=setting, predicted_bytes=predicted,
                           why=f"the {plan.backend} plan would run {what} instead")
        return None

    def measure(self, setting: Setting) -> Trial:
        """Start, load and stop one setting (once: a second call returns the first result)."""
        if setting not in self._trials:
            self._trials[setting] = self._run(setting)
        return self._trials[setting]

    def _run(self, setting: Setting) -> Trial:
        cfg = self.config
        trial_dir = cfg.out_dir / "runs" / setting.label.replace(" ", "_")
        trial_dir.mkdir(parents=True, exist_ok=True)
        plan = self.plan(setting, free_port())
        plan_json = json.dumps(plan.to_json_dict(), indent=2)
        (trial_dir / "plan.json").write_text(plan_json + "\n", encoding="utf-8")
        base_url = health_url(plan.host, plan.port, "")
        load_1m = os.getloadavg()[0]  # other work on the same cores distorts every figure: record it
        baseline = gpu_used_bytes(plan.gpus) if plan.gpus else 0
        log_path = trial_dir / "server.log"
        self._progress(f"{setting.label}: starting {plan.backend}", False)
        base: dict[str, Any] = {"setting": setting, "predicted_bytes": plan.expected_total_bytes,
                                "host_load_1m": load_1m}
        with log_path.open("w", encoding="utf-8") as server_log:
            def to_log(line: str) -> None:
                server_log.write(line + "\n")
                server_log.flush()

            supervisor = Supervisor(plan, SupervisorConfig(use_ladder=False, max_restarts=0,
                                                           health_timeout_s=cfg.ready_timeout_s),
                                    on_line=to_log, log_prefix=f"[{setting.label}]")
            supervisor.start()
            try:
                if not supervisor.wait_ready(cfg.ready_timeout_s + 30):
                    failure = supervisor.last_failure
                    why = f"{failure.kind}: {failure.evidence}" if failure else "not ready in time"
                    return Trial(**base, failure=f"the backend did not come up ({why})\n{_tail(log_path)}")
                warm_up(base_url, cfg.workload, cfg.warmup_requests)
                held: dict[str, int | str] = {}

                def measure_load(load: Load) -> LoadPoint:
                    self._progress(f"{setting.label}: {load.label} for {cfg.duration_s} s", False)
                    name = "closed" if load.rate_rps is None else f"rate{load.rate_rps:.3g}"
                    try:
                        summary = run_locust(base_url, load=load, duration_s=cfg.duration_s,
                                             workload=cfg.workload, trial_dir=trial_dir / name,
                                             drain_s=cfg.drain_s)
                        point = LoadPoint(load=load, summary=summary)
                    except TrialError as exc:
                        point = LoadPoint(load=load, failure=str(exc))
                    if supervisor.pid is not None and supervisor.is_ready():
                        used, kind = memory_in_use(supervisor.pid, plan.gpus, baseline)
                        held["bytes"] = max(used, int(held.get("bytes", 0)))
                        held["kind"] = kind
                    self._progress(f"{setting.label}: {load.label} done", True)
                    return point

                points = sweep_rates(measure_load, setting.n_parallel, self.slo, cfg.rate_steps)
            except (TrialError, httpx.HTTPError) as exc:
                return Trial(**base, failure=str(exc) or type(exc).__name__)
            finally:
                supervisor.stop()
        memory = held.get("bytes")
        return Trial(**base, points=points, memory_bytes=int(memory) if memory is not None else None,
                     memory_kind=str(held["kind"]) if "kind" in held else None)
