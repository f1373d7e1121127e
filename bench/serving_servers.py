"""Servers for bench/serving_compare.py: the GPU kit environment, the synthetic model, and the three servers
(edgeserve, llama-server, llama-cpp-python's server) started and stopped as processes."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sh(cmd: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, check=True, text=True, **kw)


# --- environment and model ----------------------------------------------------------------------------------


def kit_env(kit: Path | None, wheels: Path | None, work: Path) -> dict[str, str]:
    """Environment for the servers: with a kit, its CUDA llama.cpp, libraries and wheels (GPU host)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = [str(REPO)]
    if kit is not None:
        root = work / "llama.cpp"
        if not (root / "llama.cpp-cuda-sm90" / "bin" / "llama-server").exists():
            root.mkdir(parents=True, exist_ok=True)
            parts = sorted(kit.glob("llama.cpp-cuda-sm90.tar.xz.part*"))
            cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
            subprocess.run(["tar", "xJ", "-C", str(root)], stdin=cat.stdout, check=True)
            cat.wait()
        build = root / "llama.cpp-cuda-sm90"
        site = work / "site"
        wheel_files = [str(w) for d in (kit, wheels) if d is not None for w in sorted(d.glob("*.whl"))]
        if wheel_files and not site.exists():
            sh(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--target",
                    str(site),
                    *wheel_files,
                ],
                env,
            )
        paths.insert(0, str(site))
        env["LLAMA_CPP_LIB_PATH"] = str(build / "lib")
        env["LD_LIBRARY_PATH"] = f"{build / 'lib'}:{env.get('LD_LIBRARY_PATH', '')}"
        env["PATH"] = f"{build / 'bin'}:{env['PATH']}"
    else:
        # setup_env.sh links llama-server and llama-bench into the environment's bin.
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHONPATH"] = ":".join([*paths, env.get("PYTHONPATH", "")]).rstrip(":")
    return env


def build_model(preset: str, vocab: Path, work: Path, env: dict[str, str]) -> Path:
    """A synthetic model with real shapes, quantized to Q4_K_M (cached in the work folder)."""
    out = work / f"{preset}-Q4_K_M.gguf"
    if out.exists():
        return out
    f16 = work / f"{preset}-F16.gguf"
    sh(
        [
            sys.executable,
            "-m",
            "quantize.synthetic",
            str(f16),
            "--preset",
            preset,
            "--vocab-from",
            str(vocab),
        ],
        env,
        cwd=REPO,
    )
    sh(
        ["llama-quantize", str(f16), str(out), "Q4_K_M", str(os.cpu_count() or 4)],
        env,
        stdout=subprocess.DEVNULL,
    )
    f16.unlink()
    return out


def device_name() -> str:
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    return "CPU"


# --- servers ------------------------------------------------------------------------------------------------


class Server:
    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], port: int, ready: str, log: Path
    ) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = log
        print("+", " ".join("<code>" if "\n" in c else c for c in cmd), flush=True)
        with log.open("w") as fh:
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{name} not ready in time:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def edgeserve_cmd(env: dict[str, str]) -> list[str]:
    """`edgeserve serve` as a module; the serve module alone if the full CLI cannot import here."""
    probe = subprocess.run(
        [sys.executable, "-c", "import server.cli.app"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "server.cli.app", "serve"]
    print(f"note: full CLI not importable ({probe.stderr.strip().splitlines()[-1:]}); using server.cli.serve")
    return [sys.executable, "-m", "server.cli.serve"]


# edgeserve's KV layouts and sampling places, as `edgeserve@<variant>` server kinds: one KV pool (`pool`) or a
# cache per sequence (`seq`), sampler chains on the host or inside llama.cpp's decode graph; `noreuse` is the
# default with llama.cpp's graph reuse turned off (what reuse is worth).
EDGESERVE_VARIANTS = {
    "pool-host": ["--kv-unified", "--no-backend-sampling"],
    "pool-graph": ["--kv-unified", "--backend-sampling"],
    "seq-host": ["--no-kv-unified", "--no-backend-sampling"],
    "seq-graph": ["--no-kv-unified", "--backend-sampling"],
    "noreuse": [],
}
VARIANT_ENV = {"noreuse": {"LLAMA_GRAPH_REUSE_DISABLE": "1"}}


def variant_env(spec: str) -> dict[str, str]:
    """The environment a `kind@variant` server runs with beyond the bench's own."""
    return VARIANT_ENV.get(spec.partition(":")[0].partition("@")[2], {})


def parse_kind(spec: str, default_slots: int) -> tuple[str, str, list[str], int]:
    """`kind[@variant][:slots]` -> (name, kind, extra edgeserve arguments, slots)."""
    name, _, slots = spec.partition(":")
    kind, _, variant = name.partition("@")
    if variant and (kind != "edgeserve" or variant not in EDGESERVE_VARIANTS):
        known = ",".join(EDGESERVE_VARIANTS)
        raise SystemExit(f"unknown server {spec!r}: variants are edgeserve@{{{known}}}")
    return spec, kind, EDGESERVE_VARIANTS.get(variant, []), int(slots) if slots else default_slots


def start(kind: str, model: Path, slots: int, n_ctx_seq: int, args: argparse.Namespace, env: dict[str, str],
          work: Path) -> Server:
    """One server with `slots` sequences of `n_ctx_seq` tokens each. Kinds: edgeserve (edgeserve@VARIANT:
    a KV layout and sampling place of EDGESERVE_VARIANTS; `:N` after a kind sets its slots), llama-server,
    llama-server-bs (llama-server with --backend-sampling), llama-cpp-python."""
    env = {**env, **variant_env(kind)}
    name, kind, variant_args, slots = parse_kind(kind, slots)
    port = free_port()
    log = work / f"{name.replace('@', '-').replace(':', '-')}-{slots}.log"
    ngl = "99" if args.gpu else "0"
    if kind == "edgeserve":
        # --n-ctx is one sequence's context; the step budget is llama-server's default -b.
        cmd = [*edgeserve_cmd(env), "--model-path", str(model), "--port", str(port), "--n-parallel",
               str(slots), "--n-ctx", str(n_ctx_seq), "--n-batch", "2048", "--n-gpu-layers", ngl,
               "--max-queue", "4096", "--log-level", "warning"]
        if args.threads:
            cmd += ["--n-threads", str(args.threads)]
        cmd += variant_args + shlex.split(getattr(args, "edgeserve_args", None) or "")
        return Server(name, cmd, env, port, "/ready", log)
    if kind in ("llama-server", "llama-server-bs"):
        cmd = ["llama-server", "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-ngl", ngl,
               "-np", str(slots), "-c", str(slots * n_ctx_seq)]
        if args.gpu:
            cmd += ["-fa", "on"]
        if kind == "llama-server-bs":
            cmd += ["--backend-sampling"]
        if args.threads:
            cmd += ["-t", str(args.threads)]
        return Server(name, cmd, env, port, "/health", log)
    cmd = [
        sys.executable,
        "-m",
        "server.launch.llama_cpp_python",  # llama-cpp-python's server with the engine's CPU guard
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--n_gpu_layers", ngl,
        "--n_ctx", str(n_ctx_seq), "--verbose", "False",
        # Its default cuts a running stream short with [DONE] as soon as another request comes in.
        "--interrupt_requests", "False",
    ]
    if args.gpu:
        cmd += ["--flash_attn", "True"]
    if args.threads:
        cmd += ["--n_threads", str(args.threads)]
    return Server(kind, cmd, env, port, "/v1/models", log)


def llama_bench_tg(model: Path, gen: int, args: argparse.Namespace, env: dict[str, str]) -> float | None:
    """llama-bench tg`gen`: llama.cpp's single-sequence decode speed, t/s (None without llama-bench)."""
    if not shutil.which("llama-bench", path=env["PATH"]):
        return None
    cmd = ["llama-bench", "-m", str(model), "-p", "0", "-n", str(gen), "-r", "3", "-o", "json",
           "-ngl", "99" if args.gpu else "0"]
    if args.gpu:
        cmd += ["-fa", "1"]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    rows = json.loads(sh(cmd, env, capture_output=True).stdout)
    return float(rows[0]["avg_ts"]) if rows else None


def llama_batched_bench(model: Path, levels: list[int], prompt: int, gen: int, args: argparse.Namespace,
                        env: dict[str, str], pp: dict[int, float] | None = None) -> dict[int, float]:
    """llama-batched-bench: S_TG (decode t/s of B sequences side by side) by B, the C++ limit of batching;
    S_PP (prompt t/s) by B into `pp` when given."""
    if not shutil.which("llama-batched-bench", path=env["PATH"]):
        return {}
    n_ctx = max(levels) * (prompt + gen) + 256
    cmd = ["llama-batched-bench", "-m", str(model), "-c", str(n_ctx), "-b", "2048", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(gen), "-npl", ",".join(map(str, levels)), "-ngl",
           "99" if args.gpu else "0", "--output-format", "jsonl"]
    if args.gpu:
        cmd += ["-fa", "on"]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    out = sh(cmd, env, capture_output=True).stdout
    limits: dict[int, float] = {}
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            limits[int(row["pl"])] = float(row["speed_tg"])
            if pp is not None:
                pp[int(row["pl"])] = float(row["speed_pp"])
    return limits
