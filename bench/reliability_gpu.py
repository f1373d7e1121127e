"""`bench/reliability.py --gpu-oom`: out of memory on a capped GPU, with the gateway answering throughout.

A holder process takes all but CAP GiB of the card. The supervisor starts llama-server (llama.cpp's CUDA build
on PATH) with a context far beyond CAP: it dies with cudaMalloc out of memory, and the supervisor steps down
the OOM ladder until it serves. Meanwhile the gateway (fallback chain: that llama-server, then the embedded
engine on the CPU with the same model) answers one request after another, each counted by the backend that
served it. The supervisor's ladder steps reach the gateway's /metrics through its status file.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from loadtest.servers import free_port, metric_value, start_gateway, write_chain
from quantize.model.units import GIB


def _served_by(text: str) -> dict[str, float]:
    return {name: metric_value(text, "edgeserve_backend_attempts_total", backend=name)
            for name in ("primary", "fallback")}


def gpu_oom_run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.launcher_gpu_check import HOLDER, prepare_model
    from server.launch.planner import make_plan
    from server.launch.request import LaunchRequest
    from server.launch.supervisor import Supervisor, SupervisorConfig
    from server.launch.toolchain import probe_toolchain

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or prepare_model(work, args.vocab)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(int(args.cap_gib * GIB))],
                              stdout=subprocess.PIPE, text=True)
    gateway = None
    sup = None
    try:
        line = holder.stdout.readline() if holder.stdout else ""
        held = re.match(r"held (\d+) free (\d+) total (\d+)", line)
        if not held:
            raise SystemExit(f"the memory holder did not start: {line!r}")
        free = int(held.group(2))
        port = free_port()
        request = LaunchRequest(backend="llama-server", card=args.card, model_path=str(model), n_ctx=args.ctx,
                                n_parallel=1, port=port)
        plan = make_plan(request, toolchain=probe_toolchain())
        status = work / "primary.status.json"
        status.unlink(missing_ok=True)
        chain = write_chain(work / "gpu_chain.yaml", [
            {"name": "primary", "kind": "openai", "url": f"http://127.0.0.1:{port}", "health_url": "/health",
             "health_interval_s": 0.5, "n_parallel": 4, "queue_size": 16, "supervisor_status": str(status),
             "breaker": {"failure_threshold": 2, "cooldown_s": 2.0}},
            # 1024 tokens per sequence: the pool of 2048 cells this fallback always had
            {"name": "fallback", "kind": "embedded", "model_path": str(model), "n_gpu_layers": 0,
             "n_ctx": 1024, "n_parallel": 2, "queue_size": 32, "queue_timeout_s": 300,
             "stall_timeout_s": 300},
        ], model_name="llama31-8b-synthetic")
        gateway = start_gateway(chain, free_port(), work / "gpu_gateway.log")
        if not gateway.wait_http("/ready", 300):
            raise SystemExit("the gateway did not start:\n" + "\n".join(gateway.log_tail()))
        config = SupervisorConfig(available_bytes=free, health_timeout_s=300, health_interval_s=0.5,
                                  backoff_initial_s=1.0, max_restarts=2)
        sup = Supervisor(plan, config, status_path=status)
        t0 = time.monotonic()
        sup.start()
        requests: list[dict[str, Any]] = []
        deadline = t0 + args.gpu_deadline_s
        while time.monotonic() < deadline:
            before = _served_by(httpx.get(gateway.url + "/metrics", timeout=30).text)
            started = time.monotonic()
            reply = httpx.post(gateway.url + "/v1/completions", timeout=300,
                               json={"model": "edgeserve", "prompt": "Hello", "max_tokens": 8,
                                     "ignore_eos": True})
            after = _served_by(httpx.get(gateway.url + "/metrics", timeout=30).text)
            by = [name for name in after if after[name] > before[name]]
            requests.append({"at_s": round(started - t0, 1), "status": reply.status_code, "served_by": by,
                             "seconds": round(time.monotonic() - started, 2)})
            if by == ["primary"]:
                break
            time.sleep(1.0)
        metrics_text = httpx.get(gateway.url + "/metrics", timeout=30).text
        return {
            "gpu_total_bytes": int(held.group(3)), "held_bytes": int(held.group(1)), "free_bytes": free,
            "first_plan": {"argv": list(plan.argv), "n_ctx": plan.n_ctx,
                           "expected_total_bytes": plan.expected_total_bytes},
            "supervisor_state": sup.state, "ladder": [s.model_dump(mode="json") for s in sup.steps],
            "events": [{"kind": e.kind, "detail": e.detail[:300]} for e in sup.events],
            "final_plan_n_ctx": sup.plan.n_ctx,
            "requests": requests,
            "requests_ok": sum(1 for r in requests if r["status"] == 200),
            "served_by_fallback": sum(1 for r in requests if r["served_by"] == ["fallback"]),
            "returned_to_primary": bool(requests) and requests[-1]["served_by"] == ["primary"],
            "gateway_ladder_steps_metric": metric_value(metrics_text, "edgeserve_ladder_steps_total"),
        }
    finally:
        if sup is not None:
            sup.stop()
        if gateway is not None:
            gateway.stop()
        holder.send_signal(signal.SIGTERM)
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            holder.kill()
