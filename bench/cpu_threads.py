"""llama.cpp's CPU threads and how they wait: ms per token and the longest step of `edgeserve serve` and
llama-server by OpenMP wait policy, on an idle machine and beside busy neighbours, in one run.

    python bench/cpu_threads.py [--model M.gguf] [--servers edgeserve,edgeserve-fixed,llama-server]
        [--streams 1,8]
        [--hogs 0,1,2] [--policies unset,ACTIVE,PASSIVE,spin=10000,spin=100000,spin=1000000] [--rounds 2]

Each (server, policy) starts fresh (OpenMP reads its environment when llama.cpp loads) with its default
threads, then for every neighbour count (a neighbour spins on one core for the whole cell) and stream count
sends `streams` streamed completions of `--tokens` tokens at once (temperature 0, EOS ignored, the same
short prompt). Per cell: ms per token (a stream's time from its first to its last token / tokens - 1, median
over the streams) and the inter-token gaps' p99 and maximum (one token per stream per step: a gap is a
step). Policies: `unset` (GNU OpenMP's own default: spin about 300,000 rounds, then sleep), ACTIVE (spin),
PASSIVE (sleep at once), spin=N (GOMP_SPINCOUNT=N: spin N rounds, then sleep). Rounds alternate the
order of the policies. Writes cpu_threads.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serving_servers import REPO, Server, edgeserve_cmd, free_port, kit_env

HOG = "while True:\n    pass\n"
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def policy_env(base: dict[str, str], policy: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy in ("ACTIVE", "PASSIVE"):
        env["OMP_WAIT_POLICY"] = policy
    elif policy.startswith("spin="):
        env["GOMP_SPINCOUNT"] = policy.split("=", 1)[1]
    elif policy != "unset":
        raise SystemExit(f"unknown policy {policy!r}: unset, ACTIVE, PASSIVE or spin=N")
    return env


def start_server(kind: str, model: Path, slots: int, env: dict[str, str], work: Path, tag: str) -> Server:
    """edgeserve (its default: threads follow the free cores), edgeserve-fixed (every CPU, always), or
    llama-server (its default: every CPU)."""
    port = free_port()
    log = work / f"{kind}-{tag}.log"
    if kind.startswith("edgeserve"):
        cmd = [*edgeserve_cmd(env), "--model-path", str(model), "--port", str(port), "--n-parallel",
               str(slots), "--n-ctx", "1024", "--log-level", "warning"]
        if kind == "edgeserve-fixed":
            cmd += ["--n-threads", str(len(os.sched_getaffinity(0)))]
        return Server(kind, cmd, env, port, "/ready", log)
    cmd = ["llama-server", "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(slots * 1024)]
    return Server(kind, cmd, env, port, "/health", log)


async def stream_times(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> list[float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                payload = json.loads(line[5:])
                if any(c.get("text") for c in payload.get("choices") or ()):
                    times.append(time.perf_counter())
    return times


async def cell(url: str, model: str, streams: int, tokens: int, timeout_s: float) -> dict[str, float]:
    """The cell's figures; a cell that does not finish within `timeout_s` is a collapse (its figures are
    what arrived by then, and `collapsed` is 1)."""
    async with httpx.AsyncClient(timeout=None) as client:
        tasks = [asyncio.ensure_future(stream_times(client, url, model, tokens)) for _ in range(streams)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for t in pending:
            t.cancel()
        if pending:
            return {"ms_per_token": timeout_s * 1000 / tokens, "gap_p99_ms": timeout_s * 1000,
                    "gap_max_ms": timeout_s * 1000, "gap_p50_ms": timeout_s * 1000, "collapsed": 1}
        runs = [t.result() for t in done]
    per_token = [(t[-1] - t[0]) / (len(t) - 1) * 1000 for t in runs if len(t) > 1]
    gaps = sorted((b - a) * 1000 for t in runs for a, b in itertools.pairwise(t))
    return {"ms_per_token": statistics.median(per_token), "gap_p99_ms": gaps[int(0.99 * (len(gaps) - 1))],
            "gap_max_ms": gaps[-1], "gap_p50_ms": gaps[len(gaps) // 2], "collapsed": 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="GGUF (default: the bundled SmolLM2-135M)")
    p.add_argument("--servers", default="edgeserve,edgeserve-fixed,llama-server")
    p.add_argument("--policies", default="unset,ACTIVE,PASSIVE,spin=10000,spin=100000,spin=1000000")
    p.add_argument("--streams", default="1,8")
    p.add_argument("--hogs", default="0,1,2")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=60.0, help="a cell slower than this has collapsed")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeserve-cpu-threads")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    base = kit_env(None, None, args.work)
    if args.model is None:
        sys.path.insert(0, str(REPO))
        from quantize.bundled import default_model_path

        args.model = default_model_path()
    streams = [int(x) for x in args.streams.split(",")]
    hogs = [int(x) for x in args.hogs.split(",")]
    policies = args.policies.split(",")
    rows = []
    for rnd in range(args.rounds):
        order = policies if rnd % 2 == 0 else policies[::-1]
        for kind, policy in itertools.product(args.servers.split(","), order):
            server = start_server(kind, args.model, max(streams), policy_env(base, policy), args.work,
                                  f"{policy}-{rnd}")
            try:
                model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
                asyncio.run(cell(server.url, model, 1, 8, args.timeout_s))  # warm-up
                for n_hogs in hogs:
                    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n_hogs)]
                    try:
                        time.sleep(0.5)
                        for c in streams:
                            got = asyncio.run(cell(server.url, model, c, args.tokens, args.timeout_s))
                            row = {"round": rnd, "server": kind, "policy": policy, "hogs": n_hogs,
                                   "streams": c, **got}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                    finally:
                        for h in procs:
                            h.kill()
                            h.wait()
            finally:
                server.stop()
    report = {"cpus": os.cpu_count(), "model": args.model.name, "tokens": args.tokens, "rows": rows}
    (args.out / "cpu_threads.json").write_text(json.dumps(report, indent=1))
    print("\n| server | policy | hogs | streams | ms/token (per round) | gap p99 ms | gap max ms |")
    print("|---|---|---:|---:|---|---:|---:|")
    keyed: dict[tuple[str, str, int, int], list[dict[str, float]]] = {}
    for r in rows:
        keyed.setdefault((r["server"], r["policy"], r["hogs"], r["streams"]), []).append(r)
    for (kind, policy, n_hogs, c), got in keyed.items():
        ms = [g["ms_per_token"] for g in got]
        print(f"| {kind} | {policy} | {n_hogs} | {c} | {statistics.median(ms):.1f} "
              f"({', '.join(f'{x:.1f}' for x in ms)}) | {max(g['gap_p99_ms'] for g in got):.0f} | "
              f"{max(g['gap_max_ms'] for g in got):.0f} |")


if __name__ == "__main__":
    main()
