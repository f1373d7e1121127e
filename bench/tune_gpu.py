"""The GPU tune (issue 14), run by hand on the GPU benchmark host (an H100 or H200), never in CI.

Three tunes of the synthetic Llama-3.1-8B-shaped Q4_K_M (quantize/synthetic.py + llama-quantize, as the other
GPU benches make it), each with `--strategy both` so that the grid, run once, proves what the search saved:
  (a) the embedded engine and (b) llama-server on the whole card: n_parallel 1..64 x n_ctx 4k..32k x n_ubatch
      256..2048;
  (c) a simulated 8 GB Tesla P4: a holder process takes all but --cap-gib of the GPU (the HOLDER of
      bench/launcher_gpu_check.py), and the tesla-p4 plan (llama-server, q8_0 KV) is tuned over
      n_parallel 1..8 x n_ctx 2k..8k x n_ubatch 128..512: seed 004's two tables for the P4, measured.
Each tune writes its folder under --out (results.json, report.md, the two PNGs, per setting its plan, server
log and Locust CSVs); copy the reports to docs/tuning/ and the efficiency figures to docs/BENCHMARKS.md.

    python3 bench/tune_gpu.py --vocab ggml-vocab-llama-bpe.gguf --out results/tune --duration 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.launcher_gpu_check import HOLDER, prepare_model  # noqa: E402
from quantize.model.units import GIB  # noqa: E402

FULL = {"n_parallel": "1,2,4,8,16,32,64", "n_ctx": "4096,8192,16384,32768", "n_ubatch": "256,512,1024,2048"}
P4 = {"n_parallel": "1,2,4,8", "n_ctx": "2048,4096,8192", "n_ubatch": "128,256,512"}


def tune(name: str, backend: str, card: str, space: dict[str, str], model: Path, args: argparse.Namespace
         ) -> dict[str, object]:
    out = args.out / name
    cmd = [sys.executable, "-m", "loadtest.tuner", "run", "--strategy", "both", "--backend", backend,
           "--card", card, "--model-path", str(model), "--n-parallel", space["n_parallel"],
           "--n-ctx", space["n_ctx"], "--n-ubatch", space["n_ubatch"], "--n-batch", "2048",
           "--duration", str(args.duration), "--drain", "60",
           "--max-ttft-p95-ms", str(args.max_ttft_p95_ms),
           "--prompt-lengths", "short,medium,long", "--max-prompt-tokens", "1024", "--max-tokens", "128",
           "--title", f"GPU tune: {name}", "--out", str(out),
           "--json"]
    paths = (str(ROOT), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    answer = json.loads(proc.stdout) if proc.stdout.strip() else {"error": f"exit {proc.returncode}"}
    (args.out / f"{name}.json").write_text(json.dumps(answer, indent=2) + "\n")
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tune-gpu"))
    parser.add_argument("--vocab", type=Path, default=None, help="tokenizer GGUF for the synthetic model")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF instead of the synthetic 8B")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgeserve-bench"))
    parser.add_argument("--llama-quantize", default=shutil.which("llama-quantize") or "llama-quantize")
    parser.add_argument("--card", default="auto", help="the full card's id (default: detected)")
    parser.add_argument("--duration", type=int, default=20, help="seconds of load per load point")
    parser.add_argument("--max-ttft-p95-ms", type=float, default=2000.0)
    parser.add_argument("--cap-gib", type=float, default=8.0, help="GPU memory the simulated P4 leaves")
    parser.add_argument("--only", default="embedded,llama-server,p4", help="which tunes to run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or prepare_model(args.workdir, args.vocab, args.llama_quantize)
    only = set(args.only.split(","))
    answers = {}
    for backend in ("embedded", "llama-server"):
        if backend in only:
            answers[backend] = tune(f"h_{backend}", backend, args.card, FULL, model, args)
    if "p4" in only:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(int(args.cap_gib * GIB))],
                                  stdout=subprocess.PIPE, text=True)
        try:
            print(holder.stdout.readline().strip() if holder.stdout else "", flush=True)
            answers["p4"] = tune("p4_llama-server", "llama-server", "tesla-p4", P4, model, args)
        finally:
            holder.send_signal(signal.SIGTERM)
            holder.wait(30)
    print(json.dumps(answers, indent=2))


if __name__ == "__main__":
    main()
