"""What edgeserve's gateway costs in front of an OpenAI server: the same server measured directly and
through `edgeserve serve --backend openai` in front of it, in turns, in one run.

    python bench/gateway_overhead.py --upstream llama-server [--model M.gguf] [--levels 1,8] [--rounds 4]
    python bench/gateway_overhead.py --upstream edgeserve ...            # another edgeserve behind it
    python bench/gateway_overhead.py --kit KIT --synthetic llama32-1b --levels 1,32,64 --gpu-args ...

One upstream process serves both paths, so the only difference is the gateway. For every stream count the
paths alternate `--rounds` times (direct first in odd rounds, gateway first in even ones) on the mixed
shape of bench/serving_load.py; each figure is the median over the rounds. The gateway's own CPU time (user
+ system, from /proc) over the streamed tokens it passed is its cost per token. SGLang's stand-in is
llama-server's OpenAI endpoint: the SGLang test double parses arguments, it cannot serve tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import httpx
from serving_load import SHAPES, load, words_per_token
from serving_servers import Server, build_model, device_name, edgeserve_cmd, free_port, kit_env, start

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_gateway(upstream: Server, n_parallel: int, env: dict[str, str], work: Path,
                  extra: list[str]) -> Server:
    port = free_port()
    cmd = [*edgeserve_cmd(env), "--backend", "openai", "--upstream-url", upstream.url, "--port", str(port),
           "--n-parallel", str(n_parallel), "--max-queue", "4096", "--log-level", "warning", *extra]
    return Server("gateway", cmd, env, port, "/ready", work / "gateway.log")


def measure(server: Server, model_id: str, c: int, gen: int, wpt: float, seed: int, salt: int,
            pid: int | None) -> dict[str, float]:
    cpu0 = cpu_seconds(pid) if pid else 0.0
    wall, results = asyncio.run(load(server.url, model_id, SHAPES["mixed"], c, gen, wpt, seed, salt))
    cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    for e in errors[:3]:
        print(f"  {server.name}: {e!r}", flush=True)
    tokens = sum(s.generated_tokens for s in ok)
    ttfts = sorted(s.ttft_s for s in ok)
    chunks = sum(len(s.gaps_s) + 1 for s in ok)
    return {"tokens_per_s": tokens / wall, "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else 0.0,
            "errors": len(errors), "tokens": tokens, "chunks": chunks,
            "gateway_cpu_ms_per_token": 1000 * cpu / tokens if pid and tokens else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", default="llama-server",
                   choices=("llama-server", "llama-server-bs", "edgeserve"))
    p.add_argument("--model", type=Path)
    p.add_argument("--synthetic", help="a quantize.synthetic preset, made as Q4_K_M (needs --kit or --vocab)")
    p.add_argument("--vocab", type=Path)
    p.add_argument("--kit", type=Path)
    p.add_argument("--levels", default="1,8")
    p.add_argument("--slots", type=int, default=None, help="upstream slots (default: the largest level)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=192)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gateway-args", default="", help="extra `edgeserve serve` arguments for the gateway")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeserve-gateway-bench")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = kit_env(args.kit, None, args.work)
    args.gpu = shutil.which("nvidia-smi") is not None
    model = args.model
    if args.synthetic:
        vocab = args.vocab or (args.kit / "ggml-vocab-llama-bpe.gguf" if args.kit else None)
        if vocab is None:
            p.error("--synthetic needs --vocab or --kit")
        model = build_model(args.synthetic, vocab, args.work, env)
    if model is None:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from quantize.bundled import default_model_path

        model = default_model_path()
    levels = [int(x) for x in args.levels.split(",")]
    slots = args.slots or max(levels)
    upstream = start(args.upstream, model, slots, 2048, args, env, args.work)
    gateway = None
    rows = []
    try:
        gateway = start_gateway(upstream, slots, env, args.work, args.gateway_args.split())
        model_id = httpx.get(upstream.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        gw_model = httpx.get(gateway.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        wpt = words_per_token(upstream.url, model_id)
        for server, mid in ((upstream, model_id), (gateway, gw_model)):  # warm-up, both paths
            asyncio.run(load(server.url, mid, SHAPES["mixed"], min(8, slots), 8, wpt, 1))
        for c in levels:
            runs: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
            for r in range(args.rounds):
                order = (("direct", upstream, model_id), ("gateway", gateway, gw_model))
                for salt, (name, server, mid) in enumerate(order if r % 2 == 0 else order[::-1]):
                    # Same lengths and sampling on both paths, other words: no prompt cached by the upstream
                    # in the first run helps the second.
                    pid = gateway.proc.pid if name == "gateway" else None
                    runs[name].append(measure(server, mid, c, args.gen_tokens, wpt, 1000 * c + r,
                                              2 * r + salt + 1, pid))
            row = {"streams": c}
            for name, got in runs.items():
                for key in ("tokens_per_s", "ttft_p50_ms", "gateway_cpu_ms_per_token"):
                    row[f"{name}_{key}"] = statistics.median(g[key] for g in got)
                row[f"{name}_errors"] = sum(g["errors"] for g in got)
                row[f"{name}_all_tokens_per_s"] = [round(g["tokens_per_s"], 1) for g in got]
            row["ratio"] = row["gateway_tokens_per_s"] / row["direct_tokens_per_s"]
            row["ratios"] = [round(g["tokens_per_s"] / d["tokens_per_s"], 3)
                             for g, d in zip(runs["gateway"], runs["direct"], strict=True)]
            row["added_ttft_p50_ms"] = row["gateway_ttft_p50_ms"] - row["direct_ttft_p50_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device_name(),
              "model": model.name, "upstream": args.upstream, "slots": slots, "rows": rows}
    out = args.out / f"gateway_overhead_{args.upstream}_{model.stem}.json"
    out.write_text(json.dumps(report, indent=1))
    print("| streams | direct t/s | gateway t/s | ratio (per round) | TTFT p50 direct ms "
          "| TTFT p50 gateway ms | gateway CPU ms/token |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['streams']} | {r['direct_tokens_per_s']:.0f} | {r['gateway_tokens_per_s']:.0f} | "
              f"{r['ratio']:.2f} ({', '.join(f'{x:.2f}' for x in r['ratios'])}) | "
              f"{r['direct_ttft_p50_ms']:.0f} | "
              f"{r['gateway_ttft_p50_ms']:.0f} | {r['gateway_gateway_cpu_ms_per_token']:.3f} |")


if __name__ == "__main__":
    main()
