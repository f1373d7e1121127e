"""Reliability bench: the gateway's fallback chain under backend death, out-of-memory and floods.

CPU (default), real processes on 127.0.0.1: llama-cpp-python's server (the bundled SmolLM2-135M) is the
primary, the embedded engine in the gateway the fallback.
  kill   - N concurrent streams; kill -9 of the primary once one stream is part-way; then the primary restarts
           and the gateway must return to it (breaker half-open probe).
  oom    - the primary restarts with a context it cannot hold and dies while loading; M requests.
  burst  - 10x the fallback's capacity (slots + queue) at once: 429 + Retry-After for the excess, every
           accepted request completes, gateway RSS (VmRSS) before / peak / after.

    python bench/reliability.py [--streams 32] [--requests 20] [--burst-factor 10] [--json out.json]

GPU host (--gpu-oom): a holder process leaves CAP GiB of the card free; the supervisor starts llama-server
(llama.cpp's CUDA build on PATH) with a context that overflows it and steps down the OOM ladder while the
gateway answers every request on the embedded fallback (on the CPU); when llama-server is up, the gateway
returns to it.

    python bench/reliability.py --gpu-oom --model M.gguf --cap-gib 8 --ctx 131072 --json results/gpu_oom.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.servers import (  # noqa: E402
    ServerProcess,
    free_port,
    metric_value,
    spawn,
    start_gateway,
    start_llama_cpp_server,
    write_chain,
)

MAX_TOKENS = 32


def start_edgeserve(port: int, log_path: Path, *, n_ctx: int, parallel: int) -> ServerProcess:
    """`edgeserve serve` (embedded engine) as the primary; n_ctx per sequence, the KV cache holds them all."""
    cmd = [sys.executable, "-m", "server.cli.serve", "--port", str(port), "--n-parallel", str(parallel),
           "--n-ctx", str(n_ctx), "--log-level", "warning"]
    return spawn(cmd, log_path, port, "edgeserve")


def metrics(gateway: ServerProcess) -> str:
    return httpx.get(gateway.url + "/metrics", timeout=30).text


async def stream_one(client: httpx.AsyncClient, i: int, marks: list[list[float]], out: list[dict[str, Any]]
                     ) -> None:
    body = {"model": "edgeserve",
            "messages": [{"role": "user", "content": f"Tell story {i} about a brave cat."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    result: dict[str, Any] = {"finish": [], "usage": None, "error": None}
    started = time.monotonic()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result["error"] = f"HTTP {response.status_code}"
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result["error"] = chunk["error"].get("message")
                if chunk.get("usage"):
                    result["usage"] = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        marks[i].append(time.monotonic())
                    if choice.get("finish_reason"):
                        result["finish"].append(choice["finish_reason"])
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["latency_s"] = time.monotonic() - started
    out[i] = result


def is_ok(r: dict[str, Any]) -> bool:
    return r["error"] is None and len(r["finish"]) == 1 and r["usage"] is not None and (
        r["finish"][0] != "length" or r["usage"]["completion_tokens"] == MAX_TOKENS)


def kill_scenario(gateway: ServerProcess, primary: ServerProcess, streams: int,
                  client_timeout_s: float) -> dict[str, Any]:
    marks: list[list[float]] = [[] for _ in range(streams)]
    results: list[dict[str, Any]] = [{} for _ in range(streams)]
    killed: list[float] = []

    async def killer() -> None:
        while not any(len(m) >= 3 for m in marks):
            await asyncio.sleep(0.01)
        primary.kill9()
        killed.append(time.monotonic())

    async def run() -> None:
        limits = httpx.Limits(max_connections=streams + 4)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=client_timeout_s, limits=limits) as client:
            await asyncio.wait_for(asyncio.gather(killer(), *(stream_one(client, i, marks, results)
                                                              for i in range(streams))),
                                   client_timeout_s + 60)

    before = metrics(gateway)
    asyncio.run(run())
    after = metrics(gateway)
    kill_t = killed[0]
    # The pause each client saw across the kill: the gap between its chunks that contains the kill.
    pauses = sorted(b - a for m in marks for a, b in itertools.pairwise(m) if a <= kill_t < b)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    ok = sum(1 for r in results if is_ok(r))
    return {
        "streams": streams, "completed": ok, "completed_pct": 100.0 * ok / streams,
        "errors": [r["error"] for r in results if not is_ok(r)][:5],
        "resumed_mid_stream": delta("edgeserve_fallbacks_total", phase="mid_stream"),
        "retried_before_output": delta("edgeserve_fallbacks_total", phase="before_output"),
        "resume_pause_p50_s": statistics.median(pauses) if pauses else None,
        "resume_pause_max_s": pauses[-1] if pauses else None,
        "latency_p50_s": statistics.median(r["latency_s"] for r in results),
        "latency_max_s": max(r["latency_s"] for r in results),
    }


def return_scenario(gateway: ServerProcess, restart: Any, health: str) -> dict[str, Any]:
    before = metric_value(metrics(gateway), "edgeserve_backend_attempts_total", backend="primary")
    t0 = time.monotonic()
    primary = restart()
    healthy = primary.wait_http(health, 180)
    t_healthy = time.monotonic()
    back = None
    while healthy and time.monotonic() - t0 < 120:
        httpx.post(gateway.url + "/v1/completions",
                   json={"model": "edgeserve", "prompt": "Hi", "max_tokens": 2}, timeout=60)
        if metric_value(metrics(gateway), "edgeserve_backend_attempts_total", backend="primary") > before:
            back = time.monotonic()
            break
        time.sleep(0.25)
    return {"primary_restart_to_healthy_s": t_healthy - t0,
            "healthy_to_first_request_on_primary_s": (back - t_healthy) if back else None}


def oom_scenario(gateway: ServerProcess, doomed: ServerProcess, requests: int) -> dict[str, Any]:
    from server.hardware.oom import classify

    code = doomed.wait_exit(300)
    failure = classify(doomed.log_tail(80), code, phase="startup")
    ok = 0
    for i in range(requests):
        reply = httpx.post(gateway.url + "/v1/chat/completions", timeout=120, json={
            "model": "edgeserve", "messages": [{"role": "user", "content": f"Question {i}: name a color."}],
            "max_tokens": 8})
        ok += reply.status_code == 200 and bool(reply.json()["choices"][0]["message"]["content"])
    return {"primary_exit": code, "classified": failure.kind, "evidence": (failure.evidence or "")[:120],
            "requests": requests, "succeeded_on_fallback": ok}


def burst_scenario(gateway: ServerProcess, capacity: int, factor: int) -> dict[str, Any]:
    burst = capacity * factor
    baseline = gateway.rss_kib()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], gateway.rss_kib())
            time.sleep(0.05)

    async def run() -> list[httpx.Response | BaseException]:
        limits = httpx.Limits(max_connections=burst, max_keepalive_connections=0)
        body = {"model": "edgeserve", "prompt": "One, two, three,", "max_tokens": 8, "temperature": 0}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=300, limits=limits) as client:
            posts = (client.post("/v1/completions", json=body) for _ in range(burst))
            return list(await asyncio.gather(*posts, return_exceptions=True))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    replies = asyncio.run(run())
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join()
    time.sleep(3.0)
    after = gateway.rss_kib()
    statuses: dict[str, int] = {}
    for r in replies:
        key = str(r.status_code) if isinstance(r, httpx.Response) else type(r).__name__
        statuses[key] = statuses.get(key, 0) + 1
    refused = [r for r in replies if isinstance(r, httpx.Response) and r.status_code == 429]
    return {"burst": burst, "capacity": capacity, "statuses": statuses, "seconds": elapsed,
            "all_429_have_retry_after": all("retry-after" in r.headers for r in refused),
            "rss_mib_before": baseline / 1024, "rss_mib_peak": peak[0] / 1024, "rss_mib_after": after / 1024}


def cpu_run(args: argparse.Namespace) -> dict[str, Any]:
    from quantize.bundled import smollm2_path

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    slots, queue = 8, 8
    health = "/v1/models" if args.primary == "llama-cpp-python" else "/ready"
    chain = write_chain(work / "chain.yaml", [
        {"name": "primary", "kind": "openai", "url": f"http://127.0.0.1:{port}", "n_ctx": 1024,
         "n_parallel": args.streams, "queue_size": args.streams, "health_url": health,
         "health_interval_s": 0.5,
         "breaker": {"failure_threshold": 3, "cooldown_s": 2.0}},
        # 1024 tokens per sequence: a pool of 8192 cells for the fallback's eight
        {"name": "fallback", "kind": "embedded", "n_ctx": 1024, "n_parallel": slots, "queue_size": queue,
         "queue_timeout_s": 300},
    ])
    primaries: list[ServerProcess] = []

    def primary_with(n_ctx: int = 1024) -> ServerProcess:
        log_path = work / f"primary{len(primaries) + 1}.log"
        if args.primary == "edgeserve":
            proc = start_edgeserve(port, log_path, n_ctx=n_ctx, parallel=args.streams)
        else:
            proc = start_llama_cpp_server(smollm2_path(), port, log_path, n_ctx=n_ctx)
        primaries.append(proc)
        return proc

    primary = primary_with()
    gateway = start_gateway(chain, free_port(), work / "gateway.log")
    report: dict[str, Any] = {}
    try:
        if not (primary.wait_http(health, 300) and gateway.wait_http("/ready", 300)):
            raise SystemExit("servers did not start; see " + str(work))
        while metric_value(metrics(gateway), "edgeserve_chain_backend_available", backend="primary") != 1:
            time.sleep(0.2)
        report["kill"] = kill_scenario(gateway, primary, args.streams, args.client_timeout_s)
        report["return"] = return_scenario(gateway, primary_with, health)
        primaries[-1].kill9()
        # Out of memory at start: always llama-cpp-python's server, whose huge KV allocation fails cleanly.
        doomed = start_llama_cpp_server(smollm2_path(), port, work / "primary-oom.log", n_ctx=100_000_000)
        primaries.append(doomed)
        report["oom"] = oom_scenario(gateway, doomed, args.requests)
        report["burst"] = burst_scenario(gateway, slots + queue, args.burst_factor)
    finally:
        for proc in primaries:
            proc.stop()
        gateway.stop()
    return report


def markdown(report: dict[str, Any], command: str) -> str:
    k, ret, o, b = report["kill"], report["return"], report["oom"], report["burst"]
    back = ret["healthy_to_first_request_on_primary_s"]
    rows = [
        ("kill -9 of the primary", f"{k['streams']} streams", f"{k['completed']} ({k['completed_pct']:.1f}%)",
         f"{k['resumed_mid_stream']:.0f} resumed mid-stream, {k['retried_before_output']:.0f} retried before "
         f"output; pause across the kill in a resumed stream: p50 {k['resume_pause_p50_s'] or 0:.2f} s, max "
         f"{k['resume_pause_max_s'] or 0:.2f} s; latency p50 {k['latency_p50_s']:.1f} s, "
         f"max {k['latency_max_s']:.1f} s"),
        ("primary restarted", "-", "-",
         f"healthy {ret['primary_restart_to_healthy_s']:.1f} s after the restart; first request on it again "
         + (f"{back:.1f} s later (breaker half-open probe)" if back is not None else "never")),
        ("primary out of memory at start", f"{o['requests']} requests", f"{o['succeeded_on_fallback']}",
         f"primary exit {o['primary_exit']}, classified {o['classified']}: {o['evidence']}"),
        (f"burst {b['burst'] // b['capacity']}x capacity ({b['capacity']})", f"{b['burst']} requests",
         f"{b['statuses'].get('200', 0)}",
         f"statuses {b['statuses']}; Retry-After on every 429: {b['all_429_have_retry_after']}; gateway "
         f"RSS {b['rss_mib_before']:.0f} MiB before, {b['rss_mib_peak']:.0f} peak, "
         f"{b['rss_mib_after']:.0f} after"),
    ]
    lines = ["| scenario | sent | succeeded | details |", "| --- | --- | --- | --- |",
             *(f"| {a} | {n} | {ok} | {d} |" for a, n, ok, d in rows)]
    return f"`{command}`\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--primary", choices=("llama-cpp-python", "edgeserve"), default="llama-cpp-python",
                        help="the primary process: llama-cpp-python's server (one request at a time) or "
                        "`edgeserve serve` (continuous batching: every stream is mid-way at the kill)")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--client-timeout-s", type=float, default=900.0, help="each client's read timeout")
    parser.add_argument("--burst-factor", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgeserve-reliability"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--gpu-oom", action="store_true", help="the GPU-host OOM case (see the module doc)")
    parser.add_argument("--model", type=Path, default=None, help="--gpu-oom: GGUF (default: synthetic 8B)")
    parser.add_argument("--vocab", type=Path, default=None, help="--gpu-oom: tokenizer for it")
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--ctx", type=int, default=131072)
    parser.add_argument("--card", default="auto", help="--gpu-oom: card profile for the plan")
    parser.add_argument("--gpu-deadline-s", type=float, default=480.0, help="--gpu-oom: stop sending after")
    args = parser.parse_args()
    command = "python bench/reliability.py " + " ".join(sys.argv[1:])
    if args.gpu_oom:
        from bench.reliability_gpu import gpu_oom_run

        report = gpu_oom_run(args)
        text = json.dumps(report, indent=2)
    else:
        report = cpu_run(args)
        report["machine"] = f"{platform.node()} {platform.machine()}, {len(_cpus())} CPUs"
        text = markdown(report, command)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _cpus() -> list[int]:
    import os

    return sorted(os.sched_getaffinity(0))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
