"""Serving speed as clients see it, side by side in one run: `edgeserve serve` (embedded engine) against
llama-server (its default sampling, and with --backend-sampling) on the same model, with the C++ limits of
the same build (llama-batched-bench S_TG, llama-bench tg) measured in the same run.

Request shapes (bench/serving_load.py SHAPES): greedy; sampled (temperature + top_p, what chat clients send);
sampled with top_k, min_p and penalties; chat completions; prompts of mixed lengths. Every server is started
once per model with `--slots` sequence slots and serves every shape at every stream count. Per run: aggregate
t/s (generated tokens / wall time), decode t/s (decode tokens / time while any request decoded), TTFT p50,
ITL p50 (time between streamed content chunks), and for edgeserve the decode thread's time per step phase
(from its /metrics).

GPU host (KIT: the CUDA llama.cpp build and its wheels):
    python bench/serving_compare.py --kit KIT --synthetic llama32-1b,llama31-8b --out $OUT
CPU:
    python bench/serving_compare.py --cpu --servers edgeserve,llama-cpp-python --levels 1,8 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
from serving_load import SHAPES, Run, Sample, load, words_per_token
from serving_report import section, write_doc
from serving_servers import (
    REPO,
    Server,
    build_model,
    device_name,
    kit_env,
    llama_batched_bench,
    llama_bench_tg,
    parse_kind,
    start,
)

PHASE_METRIC = "edgeserve_engine_step_seconds_total"
STEPS_METRIC = "edgeserve_engine_steps_total"
IN_GRAPH_METRIC = "edgeserve_engine_sampled_in_graph_tokens_total"
GENERATED_METRIC = "edgeserve_generation_tokens_total"
COUNTS = ("steps", "in_graph_tokens", "generated_tokens")


def engine_counters(server: Server) -> dict[str, float]:
    """edgeserve's step-phase seconds and step count from its /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(PHASE_METRIC + "{"):
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            out[phase] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(STEPS_METRIC + " "):
            out["steps"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(IN_GRAPH_METRIC + " "):
            out["in_graph_tokens"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(GENERATED_METRIC + " "):
            out["generated_tokens"] = float(line.rsplit(" ", 1)[1])
    return out


def per_step_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float] | None:
    steps = after.get("steps", 0.0) - before.get("steps", 0.0)
    if steps <= 0:
        return None
    profile = {k: (after[k] - before.get(k, 0.0)) / steps * 1000 for k in after if k not in COUNTS}
    for k in COUNTS:
        profile[k] = after.get(k, 0.0) - before.get(k, 0.0)
    return profile


def run_level(server: Server, model_id: str, shape_name: str, c: int, gen: int, wpt: float,
              seed: int) -> Run:
    shape = SHAPES[shape_name]
    is_edgeserve = server.name.startswith("edgeserve")
    before = engine_counters(server) if is_edgeserve else {}
    wall, results = asyncio.run(load(server.url, model_id, shape, c, gen, wpt, seed))
    profile = per_step_ms(before, engine_counters(server)) if is_edgeserve else None
    ok = [r for r in results if isinstance(r, Sample)]
    for err in results:
        if not isinstance(err, Sample):
            print(f"  {server.name}: request failed: {err!r}", flush=True)
    return Run(server.name, shape_name, c, len(results), len(results) - len(ok), wall, ok, profile)


def line(run: Run) -> str:
    def ms(v: float | None) -> str:
        return f"{v * 1000:.1f}" if v is not None else "?"

    decode = f"{run.decode_tokens_per_s:.0f}" if run.decode_tokens_per_s else "?"
    return (f"{run.server:16s} {run.shape:13s} streams {run.concurrency:3d}: {run.tokens_per_s:7.0f} t/s, "
            f"decode {decode} t/s, TTFT p50 {ms(run.ttft_p50_s)} ms, ITL p50 {ms(run.itl_p50_s)} ms, "
            f"{run.errors} errors")


def bench_model(model: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, object]:
    shapes = args.shapes.split(",")
    levels = [int(x) for x in args.levels.split(",")]
    slots = max(levels)
    # Room for the longest prompt of the shapes plus the generated tokens, in every slot.
    longest = max(s.prompt_tokens if isinstance(s.prompt_tokens, int) else s.prompt_tokens[1]
                  for s in map(SHAPES.__getitem__, shapes))
    n_ctx_seq = max(1024, longest) + args.gen_tokens + 64
    runs: list[Run] = []
    for kind in args.servers.split(","):
        server = start(kind, model, slots, n_ctx_seq, args, env, args.work)
        server_slots = parse_kind(kind, slots)[3]
        try:
            model_id = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
            wpt = words_per_token(server.url, model_id)
            warm = min(8, server_slots)
            asyncio.run(load(server.url, model_id, SHAPES["sampled"], warm, 8, wpt, 1))  # warm-up
            for shape in shapes:
                for c in levels:
                    if c not in SHAPES[shape].levels_for(levels) or c > server_slots:
                        continue
                    run = run_level(server, model_id, shape, c, args.gen_tokens, wpt, 1000 * c)
                    runs.append(run)
                    print("  " + line(run), flush=True)
        finally:
            server.stop()
            if args.keep_logs:
                tail = server.log.read_text(errors="replace")[-200_000:]
                (args.out / f"{model.stem}-{kind}.log").write_text(tail)
    s_pp: dict[int, float] = {}
    limits = llama_batched_bench(model, levels, args.bench_prompt, args.gen_tokens, args, env, s_pp)
    tg = llama_bench_tg(model, args.gen_tokens, args, env)
    return {"model": model.name, "model_bytes": model.stat().st_size, "llama_bench_tg_tokens_per_s": tg,
            "batched_bench_s_tg": {str(k): v for k, v in limits.items()},
            "batched_bench_s_pp": {str(k): v for k, v in s_pp.items()},
            "batched_bench_prompt": args.bench_prompt, "slots": slots, "runs": [asdict(r) for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", help="GGUF to serve (repeatable)")
    p.add_argument("--synthetic", help="comma list of quantize.synthetic presets, built as Q4_K_M")
    p.add_argument("--vocab", type=Path, help="tokenizer for --synthetic (default: the kit's Llama-3 vocab)")
    p.add_argument("--kit", type=Path, help="GPU kit folder (CUDA llama.cpp tarball and wheels)")
    p.add_argument("--wheels", type=Path, help="extra wheels for the host")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeserve-bench")
    p.add_argument("--servers", default=None,
                   help="comma list of edgeserve, llama-server, llama-server-bs, llama-cpp-python")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--levels", default=None, help="stream counts (GPU 1,8,16,32,64; CPU 1,8)")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--bench-prompt", type=int, default=256, help="llama-batched-bench's prompt (-npp)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every server")
    p.add_argument("--cpu", action="store_true", help="no GPU even if one is present")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="JSON goes here")
    p.add_argument("--keep-logs", action="store_true", help="copy each server's log (its end) to --out")
    p.add_argument("--write-doc", action="store_true", help="append the section to docs/BENCHMARKS.md")
    p.add_argument("--from-json", type=Path, help="no run: the section of an earlier serving_compare.json")
    args = p.parse_args()
    if args.from_json is not None:
        text = section(json.loads(args.from_json.read_text()))
        print(text)
        if args.write_doc:
            write_doc(text)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = kit_env(args.kit, args.wheels, args.work)
    args.gpu = not args.cpu and shutil.which("nvidia-smi") is not None
    args.levels = args.levels or ("1,8,16,32,64" if args.gpu else "1,8")
    has_llama_server = shutil.which("llama-server", path=env["PATH"]) is not None
    args.servers = args.servers or ("edgeserve,llama-server,llama-server-bs" if has_llama_server
                                    else "edgeserve,llama-cpp-python")
    models = list(args.model or [])
    for preset in (args.synthetic.split(",") if args.synthetic else []):
        vocab = args.vocab or (args.kit / "ggml-vocab-llama-bpe.gguf" if args.kit else None)
        if vocab is None:
            p.error("--synthetic needs --vocab or --kit")
        models.append(build_model(preset, vocab, args.work, env))
    if not models:
        sys.path.insert(0, str(REPO))
        from quantize.bundled import default_model_path

        models.append(default_model_path())
    device = device_name()
    print(f"device: {device}\nmodels: {[m.name for m in models]}\nservers: {args.servers}; shapes: "
          f"{args.shapes}; streams: {args.levels}; {args.gen_tokens} generated tokens", flush=True)
    t0 = time.monotonic()
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "command": "python bench/serving_compare.py " + " ".join(sys.argv[1:]),
        "gen_tokens": args.gen_tokens,
        "shapes": {name: SHAPES[name].about for name in args.shapes.split(",")},
        "models": [bench_model(m, args, env) for m in models],
    }
    report["duration_s"] = round(time.monotonic() - t0)
    text = section(report)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_compare.json").write_text(json.dumps(report, indent=1))
    (args.out / "serving_compare.md").write_text(text)
    if args.write_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
