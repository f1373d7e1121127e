"""Replicas behind sglang-router: what the router costs, how throughput scales with boxes, and what
cache_aware routing gains over round_robin when requests share long prefixes.

Real processes on 127.0.0.1: N `edgeserve serve` replicas (the embedded engine) and sglang-router with the
settings `edgeserve cluster` picks for small boxes (server.launch.router). Requests are streamed chat
completions (bench/serving_load.py: TTFT from the first content chunk, tokens from the usage chunk).

  scaling  - distinct prompts; C streams of R requests each, against: one replica directly, the router over
             one replica (its overhead), then for n = 2..N the replicas directly (the client spreads its
             streams over them, stream k -> replica k mod n) and the router over n replicas.
  prefix   - K long shared prefixes (system prompts), each request one of them plus a short question, against
             the router over N replicas with policy cache_aware, then round_robin (fresh prefixes per run, so
             neither finds the other's caches); prefix tokens reused = the replicas' own counter.

CPU (default): the bundled SmolLM2-135M, one engine thread per replica.
    python bench/router_scaling.py --json results/router_cpu.json
GPU host (llama.cpp's CUDA build in the Python environment; several replicas share one GPU):
    python bench/router_scaling.py --model M.gguf --replicas 4 --concurrency 32 --rounds 2 \
        --replica-args "--n-gpu-layers 99 --n-parallel 16 --n-ctx 4096" --json results/router_gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_load import SHAPES, Run, Sample, Shape, load_prompts, make_prompt, words_per_token  # noqa: E402

from loadtest.servers import ServerProcess, free_port, metric_value, spawn, start_edgeserve  # noqa: E402
from server.launch.planner import make_plan  # noqa: E402
from server.launch.request import LaunchRequest  # noqa: E402
from server.launch.router import RouterSettings, router_plan  # noqa: E402

MODEL = "bench"
CHAT = SHAPES["chat"]


def start_replicas(n: int, args: argparse.Namespace, logs: Path) -> list[ServerProcess]:
    extra = shlex.split(args.replica_args)
    model = ["--model-path", args.model] if args.model else []
    servers = [
        start_edgeserve([*model, "--model-name", MODEL, *extra], logs / f"replica{i}.log") for i in range(n)
    ]
    return [s.wait_ready(timeout_s=600) for s in servers]


def start_router(replicas: list[ServerProcess], policy: str | None, logs: Path, name: str) -> ServerProcess:
    """sglang-router over `replicas` with `edgeserve cluster`'s settings (policy overridden when given)."""
    plan = make_plan(LaunchRequest(card="cpu", n_parallel=replicas_slots(replicas)))
    port, metrics = free_port(), free_port()
    settings = RouterSettings(port=port, prometheus_port=metrics, policy=policy)
    router = router_plan(settings, (plan,) * len(replicas), tuple(r.url for r in replicas), sys.executable)
    server = spawn(list(router.argv), logs / f"{name}.log", port, name)
    return server.wait_ready("/readiness", timeout_s=120)


def replicas_slots(replicas: list[ServerProcess]) -> int:
    return int(httpx.get(replicas[0].url + "/server_info", timeout=10).json()["max_running_requests"])


def run_load(urls: list[str], shape: Shape, c: int, gen: int, prompts: list[list[str]]) -> Run:
    """C streams (one per list of prompts); stream k to urls[k % len(urls)]."""
    assert len(prompts) == c
    wall, results = asyncio.run(load_prompts(urls, MODEL, shape, prompts, gen))
    samples = [x for x in results if isinstance(x, Sample)]
    return Run(
        server="",
        shape=shape.name,
        concurrency=c,
        requests=len(results),
        errors=len(results) - len(samples),
        wall_s=wall,
        samples=samples,
    )


def summary(label: str, run: Run, **extra: Any) -> dict[str, Any]:
    row = {
        "setup": label,
        "requests": run.requests,
        "errors": run.errors,
        "tokens_per_s": round(run.tokens_per_s, 1),
        "ttft_p50_ms": round(1000 * (run.ttft_p50_s or 0)),
        "ttft_p90_ms": round(1000 * p90(run)),
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def p90(run: Run) -> float:
    ttfts = sorted(s.ttft_s for s in run.samples)
    return ttfts[min(len(ttfts) - 1, round(0.9 * (len(ttfts) - 1)))] if ttfts else 0.0


def distinct_prompts(c: int, rounds: int, n_words: int, seed: int) -> list[list[str]]:
    return [[make_prompt(seed + k * rounds + r, n_words) for r in range(rounds)] for k in range(c)]


def prefix_prompts(c: int, rounds: int, prefixes: list[str], seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [
        [f"{rng.choice(prefixes)}\nQuestion {seed}-{k}-{r}: what comes next?" for r in range(rounds)]
        for k in range(c)
    ]


def reused_tokens(replicas: list[ServerProcess]) -> float:
    texts = [httpx.get(r.url + "/metrics", timeout=10).text for r in replicas]
    return sum(metric_value(t, "edgeserve_prefix_reused_tokens_total") for t in texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF for every replica (default: the bundled SmolLM2)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument(
        "--replica-args",
        default="--n-parallel 4 --n-ctx 1024 --n-threads 1",
        help="`edgeserve serve` options of every replica",
    )
    ap.add_argument("--concurrency", type=int, default=8, help="streams at once")
    ap.add_argument("--rounds", type=int, default=3, help="requests per stream, back to back")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32, help="tokens generated per request (EOS ignored)")
    ap.add_argument("--prefixes", type=int, default=6, help="shared prefixes of the prefix scenario")
    ap.add_argument("--prefix-tokens", type=int, default=400)
    ap.add_argument("--scenarios", default="scaling,prefix")
    ap.add_argument("--logs", type=Path, default=Path("/tmp/edgeserve-router-bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    scenarios = set(args.scenarios.split(","))
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpu": platform.processor(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    replicas = start_replicas(args.replicas, args, args.logs)
    started: list[ServerProcess] = []
    try:
        wpt = words_per_token(replicas[0].url, MODEL)
        n_words = max(1, round(args.prompt_tokens * wpt))
        if "scaling" in scenarios:
            rows = []
            for n in range(1, args.replicas + 1):
                prompts = distinct_prompts(args.concurrency, args.rounds, n_words, seed=1000 * n)
                urls = [r.url for r in replicas[:n]]
                direct = run_load(urls, CHAT, args.concurrency, args.gen, prompts)
                rows.append(summary(f"{n} replica(s) directly", direct, replicas=n, via="direct"))
                router = start_router(replicas[:n], None, args.logs, f"router{n}")
                started.append(router)
                prompts = distinct_prompts(args.concurrency, args.rounds, n_words, seed=1000 * n + 500)
                routed = run_load([router.url], CHAT, args.concurrency, args.gen, prompts)
                rows.append(summary(f"router over {n} replica(s)", routed, replicas=n, via="router"))
                router.stop()
            report["scaling"] = rows
        if "prefix" in scenarios:
            rows = []
            for run_no, policy in enumerate(("cache_aware", "round_robin")):
                seed = 7000 + 100 * run_no
                prefixes = [
                    f"System {seed}-{i}: " + make_prompt(seed + i, round(args.prefix_tokens * wpt))
                    for i in range(args.prefixes)
                ]
                router = start_router(replicas, policy, args.logs, f"router-{policy}")
                started.append(router)
                before = reused_tokens(replicas)
                prompts = prefix_prompts(args.concurrency, args.rounds, prefixes, seed)
                run = run_load([router.url], CHAT, args.concurrency, args.gen, prompts)
                reused = reused_tokens(replicas) - before
                prompt_tokens = sum(s.prompt_tokens or 0 for s in run.samples)
                rows.append(
                    summary(
                        f"router ({policy}) over {args.replicas} replicas",
                        run,
                        policy=policy,
                        prefix_tokens_reused=int(reused),
                        prompt_tokens=prompt_tokens,
                        reused_share=round(reused / prompt_tokens, 3) if prompt_tokens else None,
                    )
                )
                router.stop()
            report["prefix"] = rows
    finally:
        for s in [*started, *replicas]:
            s.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
