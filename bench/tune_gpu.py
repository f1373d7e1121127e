"""The GPU tune, run by hand on the GPU benchmark host (an H100 or H200), never in CI.

Two tunes of the synthetic Llama-3.1-8B-shaped Q4_K_M (written straight at Q4_K_M: quantize.synthetic_quant),
both through the launcher for the backend it plans (`--backend auto`), on the mixed workload (half chat, half
completions, all streamed, shipped prompts of about 13 to 1,300 tokens, every request its own sampling chain):
  (a) the whole card, `--strategy both`: the search, then the full grid on the same machine, so the grid
      proves what the search saved: n_parallel 4..64 x n_ctx 4k..16k x n_ubatch 512, 2048. Its winner is
      saved as the card's tuned profile under --out/tuned (`--save --tuned-dir`), and `edgeserve launch
      --dry-run` is shown what it plans with it;
  (b) the Tesla P4's settings space: a holder process takes all but --cap-gib of the GPU (the HOLDER of
      bench/launcher_gpu_check.py) and the tesla-p4 plan is tuned over what the P4's memory budget admits
      (n_parallel 1..8 x n_ctx 2k, 8k), the grid only: the search's efficiency is (a)'s. Speed measured on
      another GPU does not carry to a P4; what fits does.
Each tune writes its folder under --out (results.json, report.md with seed 004's batch-size and context
tables, the two PNGs, per setting its plan, server log and Locust CSVs). Sizes are picked for about 15
minutes of GPU time in all (6-10 s per load point, one rate bisection step where a setting misses the SLO,
about 16 s per setting with its start, an estimate): the cost in resolution is no 32k context, two physical
batch sizes, and load points short enough that p95s rest on tens of requests.

    python3 bench/tune_gpu.py --vocab ggml-vocab-llama-bpe.gguf --out results/tune
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.launcher_gpu_check import HOLDER, prepare_model  # noqa: E402
from quantize.model.units import GIB  # noqa: E402

# 30 settings: on the closed-form surfaces of tests/loadtest/test_search.py the search needs 0.21-0.36 of
# such a grid's runs (0.65 where few settings fit), against 0.24-0.43 of a 20-setting grid (one context
# fewer), where the 0.4 goal is a coin toss.
FULL = {"n_parallel": "4,8,16,32,64", "n_ctx": "4096,8192,16384", "n_ubatch": "512,2048", "strategy": "both"}
P4 = {"n_parallel": "1,2,4,8", "n_ctx": "2048,8192", "n_ubatch": "512", "strategy": "grid"}
# A try of this script on a CPU with a small model (--quick --only full): the same path, two settings.
QUICK = {"n_parallel": "1,2", "n_ctx": "2048", "n_ubatch": "512", "strategy": "both"}
# The mixed workload: what users send, not one friendly shape.
WORKLOAD = ["--mix", "chat-stream:1,completion-stream:1", "--prompt-lengths", "short,medium,long,xlong",
            "--max-prompt-tokens", "1400", "--max-tokens", "128", "--sampling", "varied"]


def _env() -> dict[str, str]:
    paths = (str(ROOT), os.environ.get("PYTHONPATH"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def tune(name: str, card: str, space: dict[str, str], model: Path, args: argparse.Namespace,
         save: bool) -> dict[str, object]:
    out = args.out / name
    cmd = [sys.executable, "-m", "loadtest.tuner", "run", "--strategy", space["strategy"],
           "--backend", "auto", "--card", card, "--model-path", str(model),
           "--n-parallel", space["n_parallel"],
           "--n-ctx", space["n_ctx"], "--n-ubatch", space["n_ubatch"], "--n-batch", "2048",
           "--duration", str(args.duration), "--drain", "20", "--rate-steps", "1",
           "--max-ttft-p95-ms", str(args.max_ttft_p95_ms), *WORKLOAD,
           "--title", f"GPU tune: {name}", "--out", str(out), "--json"]
    if save:
        cmd += ["--save", "--tuned-dir", str(args.out / "tuned")]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_env(), check=False)
    answer = json.loads(proc.stdout) if proc.stdout.strip() else {"error": f"exit {proc.returncode}"}
    (args.out / f"{name}.json").write_text(json.dumps(answer, indent=2) + "\n")
    return answer


def show_launch(model: Path, args: argparse.Namespace) -> None:
    """What `edgeserve launch` plans on this card once the tune's winner is saved (its reasons name it)."""
    cmd = [sys.executable, "-m", "server.cli.app", "launch", "--dry-run", "--model-path", str(model)]
    env = {**_env(), "EDGESERVE_TUNED_DIR": str(args.out / "tuned")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    (args.out / "launch_with_tuned.txt").write_text(f"$ EDGESERVE_TUNED_DIR={args.out / 'tuned'} "
                                                    f"edgeserve launch --dry-run --model-path {model}\n"
                                                    f"{proc.stdout}{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tune-gpu"))
    parser.add_argument("--vocab", type=Path, default=None, help="tokenizer GGUF for the synthetic model")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF instead of the synthetic 8B")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgeserve-bench"))
    parser.add_argument("--card", default="auto", help="the full card's id (default: detected)")
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per load point")
    parser.add_argument("--max-ttft-p95-ms", type=float, default=3000.0)
    parser.add_argument("--cap-gib", type=float, default=8.0, help="GPU memory the simulated P4 leaves")
    parser.add_argument("--only", default="full,p4", help="which tunes to run: full, p4")
    parser.add_argument("--quick", action="store_true", help="two settings, 3 s each: a try on a CPU")
    args = parser.parse_args()
    if args.quick:
        args.duration = 3
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or prepare_model(args.workdir, args.vocab)
    only = set(args.only.split(","))
    answers = {}
    if "full" in only:
        answers["full"] = tune("full_card", args.card, QUICK if args.quick else FULL, model, args, save=True)
        show_launch(model, args)
    if "p4" in only:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(int(args.cap_gib * GIB))],
                                  stdout=subprocess.PIPE, text=True)
        try:
            print(holder.stdout.readline().strip() if holder.stdout else "", flush=True)
            answers["p4"] = tune("tesla_p4", "tesla-p4", P4, model, args, save=False)
        finally:
            holder.send_signal(signal.SIGTERM)
            holder.wait(30)
    print(json.dumps(answers, indent=2))


if __name__ == "__main__":
    main()
