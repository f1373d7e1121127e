"""How close `edgeserve plan` is to what llama-server really holds on a GPU (nvidia-smi, per process).

Runs on the GPU host with llama.cpp's binaries on PATH (see the GPU kit's README). It writes a synthetic
Llama-3.1-8B-shaped F16 GGUF with the Llama-3 tokenizer (quantize.synthetic), quantizes it to Q4_K_M with
llama-quantize, and writes a Gemma-3-270M-shaped one (sliding window; or takes the real file with --gemma).
For each configuration it starts `llama-server -ngl 99`, waits for /health, reads the process's GPU memory
with nvidia-smi, sends one long request, reads it again and stops the server. The prediction is
quantize.budget.estimate(...).total_bytes for the detected card. llama-server's own buffer log lines (model,
KV, compute) are recorded too, so each component of the prediction can be checked; the rest (measured minus
buffers) is the CUDA context/runtime overhead.

Output: a markdown table on stdout and memory_accuracy.json in --out-dir (default: $OUT if set, else .).

    python bench/memory_accuracy.py --vocab ggml-vocab-llama-bpe.gguf [--gemma gemma-3-270m.gguf]
    python bench/memory_accuracy.py --dry-run     # predictions only, no GPU (works on a CPU machine)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from quantize.budget import Budget, estimate  # noqa: E402
from quantize.model.spec import ModelSpec  # noqa: E402
from quantize.model.units import MIB  # noqa: E402
from server.hardware.cards import GpuSet, get_card, match_card  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_report import (  # noqa: E402
    Result,
    calibration,
    error_pct,
    fmt_num,
    parse_buffer_log,
    parse_compute_apps,
    render_table,
)

LLAMA3_VOCAB = 128256
COMPONENTS = ("weights", "kv", "compute", "overhead")


@dataclass(frozen=True)
class Config:
    model: str  # "llama8b" | "gemma" | "tiny"
    n_ctx_total: int  # llama-server's -c: the KV pool of all n_parallel sequences
    n_parallel: int
    flash_attn: bool
    kv_type: str

    @property
    def name(self) -> str:
        fa = "fa" if self.flash_attn else "nofa"
        ctx = f"{self.n_ctx_total // 1024}k" if self.n_ctx_total % 1024 == 0 else str(self.n_ctx_total)
        return f"{self.model} c{ctx} np{self.n_parallel} {fa} {self.kv_type}"


# ctx 4k..64k, parallel 1..16, flash attention on and off, KV f16 / q8_0 / q4_0
LLAMA_CONFIGS = (
    Config("llama8b", 4096, 1, True, "f16"),
    Config("llama8b", 8192, 1, False, "f16"),
    Config("llama8b", 16384, 4, True, "q8_0"),
    Config("llama8b", 32768, 8, True, "q4_0"),
    Config("llama8b", 65536, 1, True, "f16"),
    Config("llama8b", 65536, 16, True, "q8_0"),
    Config("llama8b", 16384, 2, False, "f16"),
    Config("llama8b", 32768, 4, True, "f16"),
    Config("llama8b", 8192, 16, True, "q4_0"),
    Config("llama8b", 4096, 4, False, "f16"),
)
GEMMA_CONFIGS = (Config("gemma", 4096, 1, True, "f16"), Config("gemma", 32768, 2, True, "f16"))
TINY_CONFIG = Config("tiny", 512, 1, True, "f16")


# ---- pure helpers (tested on the CPU) ---------------------------------------------------------------------

def llama_server_cmd(binary: str, model: Path, cfg: Config, port: int) -> list[str]:
    return [
        binary, "-m", str(model), "-ngl", "99", "-c", str(cfg.n_ctx_total), "-np", str(cfg.n_parallel),
        "-fa", "on" if cfg.flash_attn else "off", "-ctk", cfg.kv_type, "-ctv", cfg.kv_type,
        "--fit", "off", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def predict(gpus: GpuSet, spec: ModelSpec, cfg: Config) -> Budget:
    n_ctx = cfg.n_ctx_total // cfg.n_parallel  # the budget takes one sequence's context
    return estimate(gpus, spec, None, backend="llama-server", n_ctx=n_ctx, n_parallel=cfg.n_parallel,
                    kv_type=cfg.kv_type, flash_attn=cfg.flash_attn)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--vocab", type=Path, help="tokenizer GGUF (ggml-vocab-llama-bpe.gguf) for the 8B model")
    ap.add_argument("--gemma", type=Path,
                    help="Gemma 3 270M GGUF (sliding window); default: a synthetic one")  # fmt: skip
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgeserve-memory-bench"),
                    help="where the 16 GB F16 and the Q4_K_M files go (reused when present)")  # fmt: skip
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--card", default="auto", help="card id for the prediction (default: from nvidia-smi)")
    ap.add_argument("--device", type=int, default=0, help="CUDA device index")
    ap.add_argument("--server", default="llama-server")
    ap.add_argument("--quantize", default="llama-quantize")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--only", default="", help="comma list of config name substrings to run")
    ap.add_argument("--no-load", action="store_true", help="skip the long request after /health")
    ap.add_argument("--load-tokens", type=int, default=4096, help="prompt tokens of the long request (cap)")
    ap.add_argument("--dry-run", action="store_true", help="print predictions only; no GPU, no files")
    return ap.parse_args(argv)


def select_configs(args: argparse.Namespace) -> list[Config]:
    configs = [TINY_CONFIG, *LLAMA_CONFIGS, *GEMMA_CONFIGS]
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        configs = [c for c in configs if any(k in c.name for k in keys)]
    return configs


# ---- side effects (GPU host) ------------------------------------------------------------------------------


def _smi(query: str, device: int) -> str:
    return subprocess.run(
        ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits", "-i", str(device)],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip


def detect_gpu(device: int) -> tuple[str, int]:
    line = _smi("gpu=name,memory.total", device).strip().splitlines()[0]
    name, total = (p.strip() for p in line.rsplit(",", 1))
    return name, int(float(total)) * MIB


def gpu_used_mib(device: int) -> float:
    return float(_smi("gpu=memory.used", device).strip().splitlines()[0])


def process_mib(pid: int, device: int, baseline_used: float) -> tuple[float | None, str]:
    apps = parse_compute_apps(_smi("compute-apps=pid,used_memory", device))
    if pid in apps:
        return apps[pid], "pid"
    if len(apps) == 1:  # containers may show host PIDs
        return next(iter(apps.values())), "only-process"
    return gpu_used_mib(device) - baseline_used, "device-delta"


def wait_health(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError("no /health 200 in time")


def long_request(port: int, n_tokens: int, n_vocab: int) -> None:
    rng = random.Random(0)
    prompt = [rng.randrange(1000, min(n_vocab, 100000)) for _ in range(n_tokens)]
    body = json.dumps({"prompt": prompt, "n_predict": 4, "temperature": 0, "cache_prompt": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _measure(
    args: argparse.Namespace,
    res: Result,
    proc: subprocess.Popen[bytes],
    b: Budget,
    spec: ModelSpec,
    baseline: float,
    t0: float,
) -> None:
    try:
        wait_health(args.port_now, proc)
        res.startup_s = round(time.monotonic() - t0, 1)
        time.sleep(1.0)
        res.measured_idle_mib, res.method = process_mib(proc.pid, args.device, baseline)
    except Exception as exc:  # one failed config must not end the run
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return
    if args.no_load:
        return
    try:
        long_request(args.port_now, max(16, min(args.load_tokens, b.n_ctx - 64)), spec.n_vocab)
        time.sleep(0.5)
        res.measured_loaded_mib, _ = process_mib(proc.pid, args.device, baseline)
    except Exception as exc:
        res.load_error = f"{type(exc).__name__}: {exc}"[:200]


def run_config(args: argparse.Namespace, gpus: GpuSet, model: Path, spec: ModelSpec, cfg: Config) -> Result:
    b = predict(gpus, spec, cfg)
    res = Result(
        config=cfg.name, predicted_mib=round(b.total_bytes / MIB, 1),
        predicted={k: round(getattr(b, f"{k}_bytes") / MIB, 1) for k in COMPONENTS},
    )  # fmt: skip
    if args.dry_run:
        return res
    log_path = args.workdir / f"server-{cfg.name.replace(' ', '_')}.log"
    baseline = gpu_used_mib(args.device)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(args.device))
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(llama_server_cmd(args.server, model, cfg, args.port_now), stdout=log,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            _measure(args, res, proc, b, spec, baseline, t0)
        finally:
            stop(proc)
    res.logged = parse_buffer_log(log_path.read_text(errors="replace"))
    res.error_idle_pct = error_pct(res.predicted_mib, res.measured_idle_mib)
    res.error_loaded_pct = error_pct(res.predicted_mib, res.measured_loaded_mib)
    if res.measured_idle_mib is not None and res.logged:
        res.observed_overhead_mib = round(res.measured_idle_mib - sum(res.logged.values()), 1)
    return res


def prepare_models(args: argparse.Namespace) -> dict[str, Path]:
    from quantize.synthetic import LLAMA31_8B, TINY, write_synthetic_gguf

    args.workdir.mkdir(parents=True, exist_ok=True)
    f16 = args.workdir / "llama31-8b-f16.gguf"
    q4 = args.workdir / "llama31-8b-q4_k_m.gguf"
    tiny = args.workdir / "tiny-f16.gguf"
    if not q4.exists():
        if not f16.exists():
            t = time.monotonic()
            write_synthetic_gguf(f16, LLAMA31_8B, vocab_from=args.vocab)
            print(f"wrote {f16} in {time.monotonic() - t:.0f} s", file=sys.stderr)
        t = time.monotonic()
        subprocess.run([args.quantize, str(f16), str(q4), "Q4_K_M", str(os.cpu_count() or 8)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        print(f"quantized {q4} in {time.monotonic() - t:.0f} s", file=sys.stderr)
        f16.unlink(missing_ok=True)  # 16 GB: keep only what the runs need
    if not tiny.exists():
        write_synthetic_gguf(tiny, TINY, vocab_from=args.vocab)
    gemma = args.gemma
    if gemma is None:
        gemma = args.workdir / "gemma3-270m-like-f16.gguf"
        if not gemma.exists():
            from quantize.synthetic_gemma3 import write_gemma3_like

            write_gemma3_like(gemma, args.vocab)
    return {"llama8b": q4, "tiny": tiny, "gemma": gemma}


def dry_run_specs() -> dict[str, ModelSpec]:
    from quantize.model.tensor_types import spec_at_level
    from quantize.synthetic import LLAMA31_8B, TINY, synthetic_model_spec
    from quantize.synthetic_gemma3 import gemma3_like_spec

    return {
        "llama8b": spec_at_level(synthetic_model_spec(LLAMA31_8B, LLAMA3_VOCAB), "Q4_K_M"),
        "tiny": synthetic_model_spec(TINY, LLAMA3_VOCAB),
        "gemma": gemma3_like_spec(LLAMA3_VOCAB),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = select_configs(args)
    if args.dry_run:
        gpus = GpuSet.of(get_card("h100-80gb" if args.card == "auto" else args.card))
        gpu_name = f"{gpus.card.name} (dry run: predictions only)"
        specs = dry_run_specs()
        configs = [c for c in configs if c.model in specs]
        models: dict[str, Path] = {}
    else:
        if args.vocab is None or shutil.which(args.server) is None:
            print("needs --vocab and llama-server on PATH (or --dry-run)", file=sys.stderr)
            return 2
        gpu_name, total = detect_gpu(args.device)
        card = match_card(gpu_name, total) if args.card == "auto" else get_card(args.card)
        if card is None:
            print(f"{gpu_name} is not in the card table; pass --card", file=sys.stderr)
            return 2
        gpus = GpuSet(card=card, count=1, measured_memory_bytes=total)
        models = prepare_models(args)
        from quantize.model.gguf_file import read_model_spec

        specs = {k: read_model_spec(p) for k, p in models.items()}
    results = []
    t0 = time.monotonic()
    for i, cfg in enumerate(configs):
        # a fresh port per server: the previous one may linger in TIME_WAIT
        args.port_now = args.port + i
        r = run_config(args, gpus, models.get(cfg.model, Path()), specs[cfg.model], cfg)
        print(f"{cfg.name}: predicted {r.predicted_mib:,.0f} MiB, measured {fmt_num(r.measured_idle_mib)} / "
              f"{fmt_num(r.measured_loaded_mib)} MiB {r.error or ''}", file=sys.stderr)  # fmt: skip
        results.append(r)
    print(render_table(results, gpu_name))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        logs = args.out_dir / "memory_accuracy_logs"
        logs.mkdir(exist_ok=True)
        for log in args.workdir.glob("server-*.log"):
            shutil.copy(log, logs / log.name)
    out = args.out_dir / "memory_accuracy.json"
    out.write_text(json.dumps({
        "gpu": gpu_name, "card": gpus.card.id, "elapsed_s": round(time.monotonic() - t0, 1),
        "configs": [asdict(c) | {"name": c.name} for c in configs], "results": [asdict(r) for r in results],
        "overhead_calibration": calibration(results),
    }, indent=1))  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
