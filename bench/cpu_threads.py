"""llama.cpp's CPU threads on a machine whose cores are shared: decode speed of the embedded engine by thread
count and OpenMP wait policy, on an idle machine and with a CPU hog beside it.

    python bench/cpu_threads.py [--threads 1,2] [--streams 1,4] [--tokens 48] [--hogs 0,1]

Each cell runs in a fresh process (OMP_WAIT_POLICY is read when llama.cpp's OpenMP runtime loads): the
bundled SmolLM2, `streams` greedy requests of `tokens` tokens at once, EOS ignored; a hog is a process that
spins on one core for the whole cell. Prints a table and writes cpu_threads.json to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CELL = r"""
import asyncio, json, sys, time
sys.path.insert(0, {repo!r})
import server  # noqa: F401  (llama.cpp before numpy)
from quantize.bundled import default_model_path
from server.engine.engine import Engine, EngineConfig
from server.engine.types import SamplingParams

threads, streams, tokens = {threads}, {streams}, {tokens}
eng = Engine(EngineConfig(model_path=str(default_model_path()), n_ctx=512, n_parallel=max(streams, 1),
                          n_threads=threads))
eng.start()

async def one(i):
    n = 0
    prompt = eng.tokenize(f"Story number {{i}}: once upon a time")
    async for ev in eng.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)):
        n += len(ev.token_ids)
    return n

async def all_():
    return await asyncio.gather(*(one(i) for i in range(streams)))

asyncio.run(all_())  # warm-up
t0 = time.perf_counter()
n = sum(asyncio.run(all_()))
print(json.dumps({{"tokens_per_s": n / (time.perf_counter() - t0)}}))
eng.stop()
"""

HOG = "import time\nwhile True:\n    pass\n"


def cell(threads: int, streams: int, tokens: int, policy: str, timeout_s: float) -> float | None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    code = CELL.format(repo=str(REPO), threads=threads, streams=streams, tokens=tokens)
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=timeout_s, check=True)
    except subprocess.TimeoutExpired:
        return None  # collapsed: slower than tokens / timeout
    return float(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--streams", default="1,4")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--hogs", default="0,1")
    p.add_argument("--policies", default="default,PASSIVE")
    p.add_argument("--timeout-s", type=float, default=180.0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = p.parse_args()
    rows = []
    ints = [[int(x) for x in getattr(args, k).split(",")] for k in ("hogs", "threads", "streams")]
    grid = itertools.product(ints[0], args.policies.split(","), ints[1], ints[2])
    for hogs, policy, threads, streams in grid:
        hog_procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
        try:
            time.sleep(0.5)
            tps = cell(threads, streams, args.tokens, policy, args.timeout_s)
        finally:
            for h in hog_procs:
                h.kill()
                h.wait()
        rows.append({"hogs": hogs, "policy": policy, "threads": threads, "streams": streams,
                     "tokens_per_s": tps})
        floor = args.tokens * streams / args.timeout_s
        shown = f"{tps:.1f}" if tps is not None else f"< {floor:.2f} (timeout)"
        print(f"hogs {hogs}  OMP_WAIT_POLICY {policy:8s}  threads {threads}  streams {streams}: {shown} t/s",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_threads.json").write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
