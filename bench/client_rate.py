"""What one client and eight concurrent ones get through the official `openai` client (issue 9's CPU goals).

    python bench/client_rate.py                                   # bundled model, edgeserve and llama-server
    python bench/client_rate.py --servers edgeserve --rounds 3 --gen-tokens 64 --json out.json

Every server serves the same model with 8 slots. Per server and route (chat, completions):
  greedy x1     `--rounds` x 8 requests one after another, temperature 0
  sampled x1    the same with temperature 0.8 (the issue's shape; other sampling fields left to the server)
  sampled x8    8 threads, each sending `--rounds` requests back to back, temperature 0.8
Prompts are the load tests' shipped short and medium prompts, each behind a fresh tag (no prefix-cache hits).
Rate = completion tokens (usage) / wall time. Goals: sampled x8 >= 1.5x sampled x1; sampled x1 within 10% of
greedy x1. EOS is ignored so every request generates `--gen-tokens`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI
from serving_servers import Server, kit_env, start

from loadtest.prompts import fresh, select

CONCURRENCY = 8
ROUTES = ("chat", "completions")


def one_request(client: OpenAI, model: str, route: str, text: str, gen: int, temperature: float) -> int:
    extra = {"ignore_eos": True}
    if route == "chat":
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                              max_tokens=gen, temperature=temperature, extra_body=extra)
        usage = chat.usage
    else:
        done = client.completions.create(model=model, prompt=text, max_tokens=gen, temperature=temperature,
                                         extra_body=extra)
        usage = done.usage
    return usage.completion_tokens if usage else 0


def measure(url: str, model: str, route: str, streams: int, rounds: int, gen: int, temperature: float,
            seed: int) -> dict[str, float]:
    """`streams` threads, each `rounds` requests back to back; tokens/s over the wall time of all."""
    prompts = select(("short", "medium"), max_tokens=400)
    rng = random.Random(seed)
    texts = [[fresh(rng.choice(prompts), rng) for _ in range(rounds)] for _ in range(streams)]
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def stream(k: int) -> int:
        return sum(one_request(client, model, route, t, gen, temperature) for t in texts[k])

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(stream, range(streams)))
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": round(wall, 2), "tps": round(tokens / wall, 1)}


def run_server(server: Server, route: str, args: argparse.Namespace) -> dict[str, object]:
    model = OpenAI(base_url=server.url + "/v1", api_key="none").models.list().data[0].id
    measure(server.url, model, route, 1, 1, 8, 0.0, seed=0)  # warm-up: first-request costs stay out
    seq = args.rounds * CONCURRENCY
    greedy = measure(server.url, model, route, 1, seq, args.gen_tokens, 0.0, seed=1)
    sampled = measure(server.url, model, route, 1, seq, args.gen_tokens, 0.8, seed=2)
    concurrent = measure(server.url, model, route, CONCURRENCY, args.rounds, args.gen_tokens, 0.8, seed=3)
    return {
        "server": server.name, "route": route, "greedy_x1": greedy, "sampled_x1": sampled,
        f"sampled_x{CONCURRENCY}": concurrent,
        "concurrent_over_sequential": round(concurrent["tps"] / sampled["tps"], 2),
        "sampled_over_greedy": round(sampled["tps"] / greedy["tps"], 2),
    }


def table(rows: list[dict[str, object]]) -> str:
    lines = [f"| server | route | greedy x1 t/s | sampled x1 t/s | sampled x{CONCURRENCY} t/s | "
             f"x{CONCURRENCY} / x1 (goal >= 1.5) | sampled / greedy (goal >= 0.9) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        g, s, c = r["greedy_x1"], r["sampled_x1"], r[f"sampled_x{CONCURRENCY}"]
        lines.append(f"| {r['server']} | {r['route']} | {g['tps']} | {s['tps']} | {c['tps']} | "  # type: ignore[index]
                     f"{r['concurrent_over_sequential']} | {r['sampled_over_greedy']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF (default: the bundled SmolLM2)")
    p.add_argument("--servers", default="edgeserve,llama-server",
                   help="comma list of edgeserve, llama-server, llama-cpp-python")
    p.add_argument("--routes", default=",".join(ROUTES))
    p.add_argument("--rounds", type=int, default=2, help="requests per client thread at 8 streams")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every server (default: theirs)")
    p.add_argument("--edgeserve-args", default="", help="more `edgeserve serve` options, e.g. '--kv-unified'")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.gpu = False
    if args.model is None:
        from quantize.bundled import smollm2_path
        args.model = smollm2_path()
    work = Path(tempfile.mkdtemp(prefix="edgeserve-client-rate-"))
    env = kit_env(None, None, work)
    load_before = os.getloadavg()
    rows = []
    for kind in args.servers.split(","):
        server = start(kind, args.model, CONCURRENCY, 1024, args, env, work)
        try:
            for route in args.routes.split(","):
                rows.append(run_server(server, route, args))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "model": args.model.name,
              "gen_tokens": args.gen_tokens, "rounds": args.rounds, "load_before": load_before,
              "load_after": os.getloadavg(), "rows": rows}
    print(table(rows))
    print(f"load average before {load_before}, after {result['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
