"""kill -9 of one box under load, behind sglang-router: what clients get, and how long the router takes to
drop the box and to take it back.

The cluster is started the way `edgeserve cluster up` starts it (server.launch.cluster_runner): N boxes on
127.0.0.1, each `edgeserve launch` (its supervisor restarts the box's gateway after a crash) and the router
with the settings edgeserve picks for small boxes. Then C non-streamed chat requests and S streams at once,
and kill -9 of box 1's gateway once it has requests in flight. Afterwards one request with a fresh prompt
every 0.25 s until the restarted box serves one.

    python bench/router_failover.py [--boxes 3] [--requests 24] [--streams 6] [--json out.json]
GPU host (several boxes on one GPU; llama.cpp's CUDA build in the Python environment):
    python bench/router_failover.py --model M.gguf --box-settings '{"n_gpu_layers": 99, "n_parallel": 16}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.servers import free_port, metric_value  # noqa: E402
from server.launch.cluster_runner import ClusterRunner  # noqa: E402
from server.launch.planner import make_plan  # noqa: E402
from server.launch.process import children  # noqa: E402
from server.launch.replicas import ClusterPlan, ReplicaCluster, plan_replica_cluster  # noqa: E402
from server.launch.toolchain import probe_toolchain  # noqa: E402

MODEL = "bench"


def served(plan: ClusterPlan, box: int) -> float:
    text = httpx.get(plan.boxes[box].worker_url + "/metrics", timeout=10).text
    return metric_value(text, "edgeserve_requests_total", route="/v1/chat/completions", status="200")


def router_metric(plan: ClusterPlan, name: str, **labels: str) -> float:
    return metric_value(httpx.get(plan.router.metrics_url, timeout=10).text, name, **labels)


async def load(plan: ClusterPlan, runner: ClusterRunner, args: argparse.Namespace) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=plan.router.url + "/v1", api_key="none", max_retries=0, timeout=900)
    outcome: dict[str, Any] = {}

    async def one(i: int) -> str:
        try:
            r = await client.chat.completions.create(
                model=MODEL,
                max_tokens=args.gen,
                temperature=0,
                messages=[{"role": "user", "content": f"Request {i}: count from {i} to {i + 40}."}],
            )
            return "ok" if r.choices[0].finish_reason else "no finish_reason"
        except openai.APIError as exc:
            return type(exc).__name__

    async def stream(i: int) -> str:
        finish, chunks = None, 0
        try:
            s = await client.chat.completions.create(
                model=MODEL,
                max_tokens=args.gen,
                temperature=0,
                stream=True,
                messages=[{"role": "user", "content": f"Story {i}."}],
            )
            async for chunk in s:
                chunks += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            return "ok" if finish else "ended without finish_reason"
        except openai.APIError as exc:
            return f"{type(exc).__name__} after {chunks} chunks"

    async with client:
        tasks = [asyncio.create_task(one(i)) for i in range(args.requests)]
        streams = [asyncio.create_task(stream(i)) for i in range(args.streams)]
        # The busiest box, once it has a full batch running (or after 20 s, whatever it has).
        box, busiest, waited = 0, 0.0, time.monotonic()
        while time.monotonic() - waited < 20:
            in_flight = [
                metric_value(
                    httpx.get(b.worker_url + "/metrics", timeout=10).text, "edgeserve_requests_in_flight"
                )
                for b in plan.boxes
            ]
            box, busiest = max(enumerate(in_flight), key=lambda x: x[1])
            if busiest >= plan.boxes[box].plan.n_parallel:
                break
            await asyncio.sleep(0.05)
        victim = plan.boxes[box]
        outcome["victim"] = {"box": box, "in_flight_at_kill": busiest}
        supervisor = runner.started[box].process.pid
        assert supervisor is not None
        (pid,) = children(supervisor)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        url = victim.worker_url
        # Until the box is up again: when the router marked it unhealthy (if it did before the restart).
        unhealthy = ready = None
        while ready is None and time.monotonic() - killed < 120:
            now = round(time.monotonic() - killed, 1)
            if unhealthy is None and router_metric(plan, "smg_worker_health", worker=url) == 0:
                unhealthy = now
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    ready = now
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
        outcome["router_marked_unhealthy_after_s"] = unhealthy
        outcome["box_ready_again_after_s"] = ready
        answers = await asyncio.gather(*tasks)
        stream_outcomes = await asyncio.gather(*streams)
    outcome["killed_at"] = killed
    outcome["requests"] = {k: answers.count(k) for k in sorted(set(answers))}
    outcome["streams"] = {k: stream_outcomes.count(k) for k in sorted(set(stream_outcomes))}
    return outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF for every box (default: the bundled SmolLM2)")
    ap.add_argument("--boxes", type=int, default=3)
    ap.add_argument(
        "--box-settings",
        default='{"n_parallel": 4, "n_ctx": 1024, "n_threads": 1}',
        help="JSON: `edgeserve launch` settings of every box",
    )
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--logs", type=Path, default=Path("/tmp/edgeserve-router-failover"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = json.loads(args.box_settings) | ({"model_path": args.model} if args.model else {})
    spec = ReplicaCluster.model_validate(
        {
            "model_name": MODEL,
            "settings": settings,
            "router": {"port": free_port(), "prometheus_port": free_port()},
            "boxes": [{"host": "127.0.0.1", "port": free_port()} for _ in range(args.boxes)],
        }
    )
    toolchain = probe_toolchain()
    plan = plan_replica_cluster(
        spec,
        lambda r: make_plan(r, toolchain=toolchain),
        edgeserve=toolchain.edgeserve,
        python=toolchain.python,
    )
    runner = ClusterRunner(plan, log_dir=args.logs, ready_timeout_s=600)
    runner.start()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "load_average": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "router": [r.model_dump() for r in plan.router.reasons],
    }
    try:
        retries = router_metric(plan, "smg_worker_retries_total")
        outcome = asyncio.run(load(plan, runner, args))
        killed = outcome.pop("killed_at")
        box = outcome["victim"]["box"]
        url = plan.boxes[box].worker_url
        outcome["router_retries"] = router_metric(plan, "smg_worker_retries_total") - retries
        outcome["breaker_opened"] = router_metric(
            plan, "smg_worker_cb_transitions_total", worker=url, to="open"
        )
        # Back: one fresh prompt (no shared prefix, so cache_aware picks the box with least cached) at a time.
        client = openai.OpenAI(base_url=plan.router.url + "/v1", api_key="none", max_retries=0, timeout=900)
        back, pinging = None, time.monotonic()
        while back is None and time.monotonic() - pinging < 180:
            client.chat.completions.create(
                model=MODEL,
                max_tokens=2,
                temperature=0,
                messages=[{"role": "user", "content": f"{uuid.uuid4().hex} ping"}],
            )
            try:
                if served(plan, box) >= 1:
                    back = time.monotonic() - killed
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        outcome["served_again_after_s"] = round(back, 1) if back is not None else None
        outcome["load_average_after"] = os.getloadavg()
        report["outcome"] = outcome
        print(json.dumps(outcome, indent=2))
    finally:
        runner.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
