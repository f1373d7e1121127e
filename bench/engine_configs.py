"""The embedded engine in process (no HTTP), one model, under engine settings given as JSON: which KV layout
and which sampling placement serve a request shape fastest, with the decode thread's time per step phase.

    python bench/engine_configs.py MODEL.gguf '{"kv_unified": true}' '{"backend_sampling": false}' \
        [--streams 64] [--shapes greedy-fixed,greedy-mixed,sampled-mixed] [--gen-tokens 128]

Shapes: *fixed* = 256-token prompts, one request per stream (every prefill first, then decode); *mixed* =
prompts of 32-1024 tokens (log-uniform), two requests per stream back to back (prefills land between decode
steps). *greedy* = temperature 0; *sampled* = temperature 0.7, top_p 0.95, top_k 40, min_p 0.05. EOS ignored.
Prompts are random token ids, the same for every configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import server  # noqa: F401  (loads llama.cpp before numpy; see server/__init__.py)
from server.engine.engine import Engine, EngineConfig
from server.engine.types import SamplingParams


def _mixed(rng: random.Random) -> int:
    return round(32 * 32 ** rng.random())


def _fixed(rng: random.Random) -> int:
    return 256


SHAPES = {
    "greedy-fixed": ({"temperature": 0.0}, _fixed, 1),
    "sampled-fixed": ({"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05}, _fixed, 1),
    "greedy-mixed": ({"temperature": 0.0}, _mixed, 2),
    "sampled-mixed": ({"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05}, _mixed, 2),
}


async def _one(engine: Engine, prompt: list[int], params: SamplingParams) -> int:
    return sum([len(ev.token_ids) async for ev in engine.generate(prompt, params)])


async def run_shape(engine: Engine, shape: str, streams: int, gen: int) -> dict[str, object]:
    sampling, length, rounds = SHAPES[shape]
    params = SamplingParams(max_tokens=gen, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    before = engine.stats()
    t0 = time.perf_counter()

    async def stream(k: int) -> int:
        total = 0
        for r in range(rounds):
            rng = random.Random(k * 10 + r)
            total += await _one(engine, [rng.randrange(1000, 30000) for _ in range(length(rng))], params)
        return total

    generated = sum(await asyncio.gather(*(stream(k) for k in range(streams))))
    wall = time.perf_counter() - t0
    after = engine.stats()
    steps = after.steps_total - before.steps_total
    phases = {k: round((v - before.step_seconds.get(k, 0.0)) / steps * 1000, 2)
              for k, v in after.step_seconds.items()}
    return {"shape": shape, "streams": streams, "tokens_per_s": round(generated / wall), "steps": steps,
            "in_graph_tokens": after.sampled_in_graph_total - before.sampled_in_graph_total,
            "generated_tokens": generated, "ms_per_step": phases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("configs", nargs="+", help="EngineConfig fields as JSON, one configuration each")
    p.add_argument("--streams", default="64", help="comma list of stream counts")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--n-ctx", type=int, default=1216, help="context of one sequence")
    args = p.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    for raw in args.configs:
        settings = {"model_path": str(args.model), "n_ctx": args.n_ctx, "n_parallel": max(streams),
                    "n_batch": 2048, "n_gpu_layers": -1, **json.loads(raw)}
        engine = Engine(EngineConfig(**settings))
        engine.start()
        try:
            for c in streams:
                for shape in args.shapes.split(","):
                    row = asyncio.run(run_shape(engine, shape, c, args.gen_tokens))
                    print(json.dumps({"config": json.loads(raw), **row}), flush=True)
        finally:
            engine.stop()


if __name__ == "__main__":
    main()
