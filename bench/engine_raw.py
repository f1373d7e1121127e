"""Aggregate generation speed of the embedded engine by batch size, beside raw llama_decode of that shape.

    python bench/engine_raw.py                                  # bundled SmolLM2 on the CPU
    python bench/engine_raw.py --model m.gguf --n-gpu-layers 99 --batch-sizes 1,4,16,64 --gen-tokens 128

For every batch size B, B requests with a `--prompt-tokens` prompt each generate `--gen-tokens` tokens with
EOS ignored, all at once. Reported per B:
  engine t/s   generated tokens / wall time from submission to the last token (prefill included)
  decode t/s   generated tokens after each sequence's first / time from the last first-token to the end
  raw t/s      plain llama_decode of B tokens per step on a context of the same shape, greedy via numpy
  ratio        engine decode t/s / raw t/s (Python and scheduling overhead; 1.0 = none)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: off
import server  # noqa: F401  (loads llama.cpp before numpy; see server/__init__.py)
import numpy as np

# isort: on

from server.engine.batch import TokenBatch
from server.engine.engine import Engine, EngineConfig
from server.engine.llama_context import LlamaRuntime
from server.engine.types import SamplingParams


def _prompt(n_vocab: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, min(n_vocab, 20000), size=n)]


async def _one(engine: Engine, prompt: list[int], gen: int, temperature: float,
               seed: int) -> tuple[float, float, int]:
    first = 0.0
    n = 0
    params = SamplingParams(max_tokens=gen, temperature=temperature, seed=seed, ignore_eos=True)
    async for ev in engine.generate(prompt, params):
        n += len(ev.token_ids)
        if not first:
            first = time.perf_counter()
    return first, time.perf_counter(), n


async def _engine_run(engine: Engine, batch: int, prompt_tokens: int, gen: int, seed: int,
                      temperature: float = 0.0) -> dict[str, float]:
    prompts = [_prompt(engine.n_vocab, prompt_tokens, seed + i) for i in range(batch)]
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(engine, p, gen, temperature, seed + i)
                                     for i, p in enumerate(prompts)))
    end = max(r[1] for r in results)
    last_first = max(r[0] for r in results)
    total = sum(r[2] for r in results)
    after_first = total - batch
    return {
        "engine_tps": total / (end - start),
        "decode_tps": after_first / (end - last_first) if end > last_first else float("nan"),
    }


def _raw_run(rt: LlamaRuntime, batch: int, prompt_tokens: int, gen: int, seed: int) -> float:
    """B sequences decoded together with no engine: the ceiling the engine is measured against."""
    tb = TokenBatch(rt.n_batch)
    for s in range(batch):
        rt.seq_rm(s)
        tb.clear()
        tb.add_run(_prompt(rt.n_vocab, prompt_tokens, seed + s), 0, s, True)
        assert rt.decode(tb.finish()) == 0
    tokens = [100] * batch
    seqs = list(range(batch))
    start = time.perf_counter()
    for step in range(gen - 1):
        tb.clear()
        tb.add_decodes(tokens, [prompt_tokens + step] * batch, seqs)
        assert rt.decode(tb.finish()) == 0
        for i in range(batch):
            tokens[i] = int(rt.logits(i).argmax())
    elapsed = time.perf_counter() - start
    for s in range(batch):
        rt.seq_rm(s)
    return batch * (gen - 1) / elapsed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; above: sampled with a llama.cpp chain (temperature + dist)")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--kv-unified", action="store_true")
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--no-raw", action="store_true", help="skip the raw llama_decode baseline")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    if args.model:
        model = args.model
    else:
        from quantize.bundled import smollm2_path

        model = str(smollm2_path())
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    n_par = max(sizes)
    per_seq = args.prompt_tokens + args.gen_tokens + 16
    config = EngineConfig(
        model_path=model, n_ctx=per_seq, n_parallel=n_par, n_batch=max(args.n_batch, n_par),
        n_ubatch=min(512, max(args.n_batch, n_par)), n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
        flash_attn=args.flash_attn, kv_unified=args.kv_unified,
    )
    engine = Engine(config)
    engine.start()
    rows = []
    try:
        asyncio.run(_engine_run(engine, 1, args.prompt_tokens, 4, 999))  # warm-up
        for b in sizes:
            r = asyncio.run(_engine_run(engine, b, args.prompt_tokens, args.gen_tokens, 1000 * b,
                                        args.temperature))
            rows.append({"batch": b, **r})
    finally:
        engine.stop()
    if not args.no_raw:
        rt = LlamaRuntime(config)
        try:
            _raw_run(rt, 1, args.prompt_tokens, 4, 999)
            for row in rows:
                row["raw_tps"] = _raw_run(rt, int(row["batch"]), args.prompt_tokens, args.gen_tokens, 7)
                row["ratio"] = row["decode_tps"] / row["raw_tps"]
        finally:
            rt.close()

    print(f"model {Path(model).name}, prompt {args.prompt_tokens}, gen {args.gen_tokens}, "
          f"threads {config.threads}, n_gpu_layers {args.n_gpu_layers}, kv_unified {args.kv_unified}, "
          f"temperature {args.temperature}")
    print("| B | engine t/s | decode t/s | raw t/s | decode/raw |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        raw = f"{row['raw_tps']:.0f}" if "raw_tps" in row else "-"
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
        print(f"| {row['batch']} | {row['engine_tps']:.0f} | {row['decode_tps']:.0f} | {raw} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
