"""Seed 002's experiments with llama.cpp, all in one go, into docs/EXPERIMENTS.md (tables) and
docs/experiments/*.png (curves), with every llama-bench row in experiments.json under --out.

On the GPU host (llama.cpp's CUDA bin/ on PATH, run as root for the power-limit steps; about 8 minutes on an
H200 with the synthetic 8B model, which is written and quantized first):

    python bench/experiments/run_all.py --vocab ggml-vocab-llama-bpe.gguf --out "$OUT"

On a CPU, to try the scripts (a small model, tiny sizes, one thread; the power limit is skipped):

    python bench/experiments/run_all.py --quick --model SmolLM2-135M-Instruct.Q4_1.gguf --skip-power
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent), str(ROOT)]

from experiments import EXPERIMENTS, GPU, QUICK, Experiment, Sizes  # noqa: E402
from llama_bench import BenchOutput, BenchRow, run_llama_bench  # noqa: E402
from report import (  # noqa: E402
    Findings,
    RunMeta,
    batch_findings,
    cuda_graph_findings,
    flash_attn_findings,
    kv_type_findings,
    power_findings,
    replace_section,
    section,
)

FINDINGS = {"flash_attn": flash_attn_findings, "kv_types": kv_type_findings, "batch_sizes": batch_findings,
            "cuda_graphs": cuda_graph_findings}
PLOTTED = {"flash_attn", "batch_sizes", "power_limit"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", type=Path, help="GGUF to measure (default: a synthetic Llama-3.1-8B Q4_K_M)")
    ap.add_argument("--vocab", type=Path, help="tokenizer GGUF for the synthetic model (Llama-3's)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgeserve-experiments"))
    ap.add_argument("--llama-bench", default="llama-bench")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one thread, no GPU layers (a CPU try)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per test (default: the sizes')")
    ap.add_argument("--depths", default=None, help="context depths, comma separated (default: the sizes')")
    ap.add_argument("--only", default="", help=f"comma list of: {', '.join(EXPERIMENTS)}")
    ap.add_argument("--skip-power", action="store_true", help="leave the power limit alone")
    ap.add_argument("--gpu", type=int, default=0, help="GPU index for the power-limit steps")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "EXPERIMENTS.md")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    return ap.parse_args(argv)


def selected(args: argparse.Namespace) -> list[Experiment]:
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; supported: {', '.join(EXPERIMENTS)}")
    return [EXPERIMENTS[n] for n in names if not (n == "power_limit" and args.skip_power)]


def model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from launcher_gpu_check import prepare_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    return prepare_model(args.workdir, args.vocab)


def meta_of(rows: list[BenchRow], model: Path, commands: list[str]) -> RunMeta:
    first = rows[0]
    return RunMeta(date=date.today().isoformat(), device=first.gpu_info or first.cpu_info,
                   backends=first.backends, build=f"{first.build_number} ({first.build_commit})",
                   model=f"{first.model_type} ({model.name})", command="\n    ".join(commands))


def run_experiment(exp: Experiment, args: argparse.Namespace, sizes: Sizes, model: Path
                   ) -> tuple[list[BenchOutput], Findings | None]:
    if exp.name == "power_limit":
        from power import run_power

        result = run_power(args.llama_bench, model, sizes, args.gpu)
        rows = [r for o in result.outputs for r in o.rows]
        return list(result.outputs), power_findings(rows, result.limits, result.refused)
    outputs = [run_llama_bench(args.llama_bench, model, run) for run in exp.runs(sizes)]
    rows = [r for o in outputs for r in o.rows]
    errors = [o.error for o in outputs if o.error]
    if errors or not rows:
        print(f"{exp.name}: {errors or 'no rows'}", file=sys.stderr)
        return outputs, None
    return outputs, FINDINGS[exp.name](rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else GPU
    if args.reps is not None:
        sizes = replace(sizes, reps=args.reps)
    if args.depths:
        sizes = replace(sizes, depths=tuple(int(d) for d in args.depths.split(",")))
    experiments = selected(args)
    model = model_path(args)
    png_dir = args.doc.parent / "experiments"
    png_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = args.doc.read_text()
    record: dict[str, object] = {"sizes": asdict(sizes), "model": str(model), "experiments": {}}
    for exp in experiments:
        outputs, findings = run_experiment(exp, args, sizes, model)
        rows = [r for o in outputs for r in o.rows]
        record["experiments"][exp.name] = [  # type: ignore[index]
            {"command": o.command, "seconds": round(o.seconds, 1), "error": o.error,
             "rows": [asdict(r) for r in o.rows]} for o in outputs]
        png = None
        if findings is not None and findings.png is not None and exp.name in PLOTTED:
            png = f"{exp.name}.png"
            findings.png(png_dir / png)
        meta = meta_of(rows, model, [o.command for o in outputs]) if rows else None
        doc = replace_section(doc, exp.name, section(exp, findings, meta, png))
        print(f"{exp.name}: {len(rows)} rows in {sum(o.seconds for o in outputs):.0f} s", file=sys.stderr)
    args.doc.write_text(doc)
    (args.out / "experiments.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.doc} and {args.out / 'experiments.json'} ({shlex.join(sys.argv)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
