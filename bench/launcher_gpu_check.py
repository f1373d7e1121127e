"""GPU-host check of the launcher (run by hand on the GPU benchmark host, never in CI).

(i)  `llama-server --help` of the real binary: every flag the llama-server arg builder can emit must appear,
     and `-fa` must take a value (on|off|auto) in this llama.cpp.
(ii) The start-up OOM ladder on a capped card: a holder process takes all but CAP GiB of the GPU (a P4-sized
     8 GiB by default), then the supervisor starts llama-server with the tesla-p4 plan for an 8B Q4_K_M model
     and a context far too large for it; the ladder steps down until llama-server serves a completion.
Writes launcher_gpu_check.json and launcher_gpu_check.md under --out.

    python bench/launcher_gpu_check.py --out results/ --vocab ggml-vocab-llama-bpe.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantize.model.units import GIB, MIB  # noqa: E402
from server.launch import llama_server  # noqa: E402
from server.launch.planner import make_plan  # noqa: E402
from server.launch.request import LaunchRequest  # noqa: E402
from server.launch.supervisor import Supervisor, SupervisorConfig  # noqa: E402
from server.launch.toolchain import probe_toolchain  # noqa: E402

HOLDER = """
import signal, sys, torch
target = int(sys.argv[1])
free, total = torch.cuda.mem_get_info()
size = max(0, free - target)
held = torch.empty(size, dtype=torch.uint8, device="cuda")
free_after, _ = torch.cuda.mem_get_info()
print(f"held {size} free {free_after} total {total}", flush=True)
signal.pause()
"""


def help_check(binary: str) -> dict[str, Any]:
    """Every emitted flag in --help (as a whole option token), and -fa's value syntax."""
    proc = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    found = {}
    for flag in llama_server.EMITTED_FLAGS:
        pattern = re.compile(r"(^|[\s,])" + re.escape(flag) + r"(?=[\s,=]|$)", re.MULTILINE)
        found[flag] = bool(pattern.search(text))
    fa_line = next((ln.strip() for ln in text.splitlines() if re.search(r"(^|[\s,])-fa[\s,]", ln)), "")
    return {
        "binary": binary,
        "exit_code": proc.returncode,
        "flags": found,
        "missing": [f for f, ok in found.items() if not ok],
        "fa_line": fa_line,
        "fa_takes_value": "on|off" in fa_line,
        "help_lines": len(text.splitlines()),
    }


def prepare_model(workdir: Path, vocab: Path | None) -> Path:
    """An 8B-shaped synthetic model (random weights, Llama-3 tokenizer) at Q4_K_M, cached in workdir, written
    straight at Q4_K_M (quantize.synthetic_quant) in seconds, not the minutes of F16 plus llama-quantize."""
    q4 = workdir / "llama31-8b-Q4_K_M.gguf"
    if q4.is_file():
        return q4
    from quantize.synthetic import LLAMA31_8B
    from quantize.synthetic_quant import write_quantized_synthetic

    return write_quantized_synthetic(q4, LLAMA31_8B, level="Q4_K_M", vocab_from=vocab)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nvidia_smi(args: list[str]) -> str:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def gpu_used_by(pid: int) -> int | None:
    """Memory nvidia-smi shows for a process, bytes."""
    out = nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return int(parts[1]) * MIB
    return None


def ladder_run(model: Path, cap_gib: float, ctx: int, card: str) -> dict[str, Any]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(int(cap_gib * GIB))], stdout=subprocess.PIPE, text=True
    )
    try:
        line = holder.stdout.readline() if holder.stdout else ""
        m = re.match(r"held (\d+) free (\d+) total (\d+)", line)
        if not m:
            raise RuntimeError(f"the holder did not start: {line!r}")
        held, free, total = (int(x) for x in m.groups())
        request = LaunchRequest(
            backend="llama-server", card=card, model_path=str(model), n_ctx=ctx, n_parallel=1,
            port=free_port(),
        )
        plan = make_plan(request, toolchain=probe_toolchain())
        config = SupervisorConfig(
            available_bytes=free,
            health_timeout_s=300,
            health_interval_s=0.5,
            backoff_initial_s=1.0,
            max_restarts=2,
        )
        sup = Supervisor(plan, config)
        t0 = time.monotonic()
        sup.start()
        ready = sup.wait_ready(540)
        elapsed = time.monotonic() - t0
        result: dict[str, Any] = {
            "card_profile": card,
            "gpu_total_bytes": total,
            "held_bytes": held,
            "free_bytes_for_backend": free,
            "first_plan": {
                "argv": list(plan.argv),
                "n_ctx": plan.n_ctx,
                "expected_total_bytes": plan.expected_total_bytes,
            },
            "ready": ready,
            "seconds_to_ready": round(elapsed, 1),
            "steps": [s.model_dump(mode="json") for s in sup.steps],
            "events": [{"kind": e.kind, "detail": e.detail[:400]} for e in sup.events],
            "final_plan": {
                "argv": list(sup.plan.argv),
                "n_ctx": sup.plan.n_ctx,
                "kv_type": sup.plan.kv_type,
                "n_gpu_layers": sup.plan.n_gpu_layers,
                "expected_total_bytes": sup.plan.expected_total_bytes,
            },
        }
        if ready and sup.pid:
            import httpx

            base = sup.plan.health_url.rsplit("/", 1)[0]
            reply = httpx.post(
                f"{base}/v1/completions", json={"model": "edgeserve", "prompt": "Hello", "max_tokens": 8},
                timeout=60
            )
            result["completion_status"] = reply.status_code
            result["completion_tokens"] = reply.json().get("usage", {}).get("completion_tokens")
            result["measured_gpu_bytes"] = gpu_used_by(sup.pid)
            used = nvidia_smi(["--query-gpu=memory.used", "--format=csv,noheader,nounits"]).split()
            result["gpu_used_total_bytes_with_holder"] = int(used[0]) * MIB if used else None
        sup.stop()
        result["final_state"] = sup.state
        return result
    finally:
        holder.send_signal(signal.SIGTERM)
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            holder.kill()


def markdown(report: dict[str, Any]) -> str:
    h = report["help_check"]
    lines = [
        "# Launcher GPU check",
        "",
        f"GPU: {report.get('gpu', '?')}",
        "",
        "## llama-server --help against the arg builder",
        "",
        f"binary: `{h['binary']}`, {len(h['flags'])} flags checked, missing: {h['missing'] or 'none'}",
        f"`-fa` line: `{h['fa_line']}` (takes a value: {h['fa_takes_value']})",
        "",
    ]
    lad = report.get("ladder")
    if lad:
        lines += [
            "## OOM ladder on a capped card",
            "",
            f"profile {lad['card_profile']}; {lad['free_bytes_for_backend'] / GIB:.2f} GiB left free by the "
            f"holder of {lad['held_bytes'] / GIB:.1f} GiB; first plan -c {lad['first_plan']['n_ctx']} "
            f"(expected {(lad['first_plan']['expected_total_bytes'] or 0) / GIB:.2f} GiB)",
            "",
            "| step | rung | setting | old | new | why |",
            "|---|---|---|---|---|---|",
        ]
        for s in lad["steps"]:
            lines.append(
                f"| {s['step']} | {s['rung']} | {s['setting']} | {s['old']} | {s['new']} | {s['why']} |"
            )
        final = lad["final_plan"]
        lines += [
            "",
            f"ready: {lad['ready']} after {lad['seconds_to_ready']} s; final -c {final['n_ctx']}, "
            f"expected {(final['expected_total_bytes'] or 0) / GIB:.2f} GiB, measured "
            f"{(lad.get('measured_gpu_bytes') or 0) / GIB:.2f} GiB (nvidia-smi); completion HTTP "
            f"{lad.get('completion_status')}, {lad.get('completion_tokens')} tokens",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--llama-server", default=shutil.which("llama-server"))
    parser.add_argument("--vocab", type=Path, default=None, help="tokenizer GGUF for the synthetic model")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF to use instead of the synthetic 8B")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgeserve-bench"))
    parser.add_argument("--cap-gib", type=float, default=8.0, help="GPU memory left to the backend")
    parser.add_argument("--ctx", type=int, default=131072, help="the too-large context of the first plan")
    parser.add_argument("--card", default="tesla-p4", help="profile to plan with")
    parser.add_argument("--skip-ladder", action="store_true")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not args.llama_server:
        sys.exit("llama-server not found: put the kit's bin/ on PATH or pass --llama-server")
    args.out.mkdir(parents=True, exist_ok=True)
    # llama-server's own log goes to a file next to the report; the console keeps the supervisor's events.
    backend_log = logging.getLogger("edgeserve.backend")
    backend_log.propagate = False
    backend_log.addHandler(logging.FileHandler(args.out / "backend.log"))
    gpu = nvidia_smi(["--query-gpu=name,memory.total", "--format=csv,noheader"]).strip() or "no GPU"
    report: dict[str, Any] = {"gpu": gpu, "help_check": help_check(args.llama_server)}
    if not args.skip_ladder:
        args.workdir.mkdir(parents=True, exist_ok=True)
        model = args.model or prepare_model(args.workdir, args.vocab)
        report["ladder"] = ladder_run(model, args.cap_gib, args.ctx, args.card)
    (args.out / "launcher_gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "launcher_gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    ok = not report["help_check"]["missing"] and report["help_check"]["fa_takes_value"]
    if "ladder" in report:
        ok = ok and bool(report["ladder"]["ready"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
