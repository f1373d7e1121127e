"""Several models on one card within a memory budget (issue 24's GPU goal), run for real on
`edgeserve serve --models FILE`, against a single-model server of each model in the same run.

    # once: synthetic 1B, 3B and 8B shapes at Q4_K_M (quantize.synthetic + edgeserve's quantize pipeline)
    python bench/multi_model.py make --work W [--vocab ggml-vocab-llama-bpe.gguf]
    # the run (prints the --model arguments `make` wrote; the bundled model is `--model bundled`)
    python bench/multi_model.py run --work W --out O --budget-mib 8192 \
        --model 1b=W/llama32-1b-q4_k_m.gguf --model 3b=W/llama32-3b-q4_k_m.gguf \
        --model 8b=W/llama31-8b-q4_k_m.gguf --model bundled

The run writes a models file (every model with the same n_ctx / n_parallel, none pinned) and serves it, then:
  cold     each model once, in order: time to first token of a streamed request that loads it (evicting what
           the plan says), and the memory its process holds once it answered (NVML per process on a GPU, RSS
           on the CPU) against its planned memory from /v1/models;
  churn    a sequence that alternates large and small models, forcing loads and evictions;
  burst    two requests for every model at once: they wait (bounded) for each other's evictions;
  warm     --warm streamed requests per resident model (ignore_eos, --max-tokens each): TTFT and tokens/s,
           then the same requests on `edgeserve serve --model-path` of that model alone (the baseline; with
           --backend llama-server, a models file of that model alone: one supervised llama-server).
Every request must be answered (a request that is not is counted, never retried); out-of-memory is counted
from the load failures the pool reports and the servers' logs. Results: O/multi_model.json and
O/multi_model.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import yaml  # noqa: E402

from loadtest.servers import ServerProcess, metric_value, start_edgeserve  # noqa: E402
from quantize.model.units import MIB  # noqa: E402
from server.launch.process import descendants  # noqa: E402

OOM = re.compile(r"out of memory|cudaMalloc failed|failed to allocate", re.IGNORECASE)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


# --- make: the synthetic models ---------------------------------------------------------------------------


def make(args: argparse.Namespace) -> None:
    """Synthetic F16 GGUFs of the presets, quantized to --level by edgeserve's pipeline (kept if present)."""
    from quantize.pipeline import QuantizeOptions, execute, prepare, resolve_level
    from quantize.synthetic import PRESETS, write_synthetic_gguf

    args.work.mkdir(parents=True, exist_ok=True)
    flags = []
    for preset in args.presets.split(","):
        out = args.work / f"{preset}-{args.level.lower()}.gguf"
        if not out.exists():
            f16 = args.work / f"{preset}-f16.gguf"
            started = time.monotonic()
            write_synthetic_gguf(f16, PRESETS[preset], vocab_from=args.vocab)
            execute(prepare(f16, resolve_level(args.level), QuantizeOptions(out=out, verify_tokens=1)))
            f16.unlink()
            print(f"made {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
        flags.append(f"--model {preset}={out}")
    print(" ".join(flags))


# --- measuring --------------------------------------------------------------------------------------------


def process_memory(pids: set[int], on_gpu: bool) -> dict[int, int]:
    """Memory per process: what NVML charges each on GPU 0, else its RSS."""
    if on_gpu:
        from server.hardware.detect import detect

        gpus = detect().gpus[:1]
        return {p.pid: p.used_memory_bytes or 0 for g in gpus for p in g.processes if p.pid in pids}
    from loadtest.footprint import rss_bytes

    return {pid: rss_bytes([pid]) for pid in pids}


@dataclass
class Request:
    phase: str
    model: str
    ok: bool
    ttft_s: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass
class Results:
    machine: str
    on_gpu: bool
    budget_mib: int
    settings: dict[str, Any]
    planned_mib: dict[str, float] = field(default_factory=dict)
    measured_mib: dict[str, float] = field(default_factory=dict)
    gateway_mib: float | None = None
    memory_method: str = ""
    cold_ttft_s: dict[str, float] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    warm: dict[str, dict[str, float]] = field(default_factory=dict)
    single: dict[str, dict[str, float]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    loads: dict[str, float] = field(default_factory=dict)
    evictions: dict[str, float] = field(default_factory=dict)
    oom: int = 0
    wall_s: float = 0.0


def stream(client: httpx.Client, model: str, max_tokens: int, phase: str) -> Request:
    """One streamed chat request: time to first token, tokens, seconds. Never retried. Read with httpx (the
    GPU host has no openai package): an HTTP error or an error event in the stream fails the request."""
    started = time.monotonic()
    ttft = None
    tokens = 0
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": PROMPT}], "stream_options": {"include_usage": True}}
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error']}")
                choices = chunk.get("choices") or []
                if ttft is None and choices and (choices[0].get("delta") or {}).get("content"):
                    ttft = time.monotonic() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        return Request(phase, model, False, seconds=time.monotonic() - started, error=str(exc)[:300])
    return Request(phase, model, ttft is not None, ttft, time.monotonic() - started, tokens)


def warm_figures(requests: list[Request]) -> dict[str, float]:
    ok = [r for r in requests if r.ok and r.ttft_s is not None]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    decode = [(r.tokens - 1) / (r.seconds - r.ttft_s) for r in ok
              if r.ttft_s is not None and r.tokens > 1 and r.seconds > r.ttft_s]
    return {"requests": len(requests), "answered": len(ok),
            "ttft_median_s": ttfts[len(ttfts) // 2] if ttfts else float("nan"),
            "decode_tokens_per_s": sum(decode) / len(decode) if decode else float("nan")}


# --- run --------------------------------------------------------------------------------------------------


def models_file(args: argparse.Namespace, models: dict[str, str | None]) -> Path:
    settings: dict[str, Any] = {"n_ctx": args.n_ctx, "n_parallel": args.n_parallel}
    if args.n_threads:
        settings["n_threads"] = args.n_threads
    entries = [{"name": name, **({"path": path} if path else {}), "backend": args.backend,
                "settings": dict(settings)} for name, path in models.items()]
    path = args.work / ("models.yaml" if len(models) > 1 else f"single-{next(iter(models))}.yaml")
    path.write_text(yaml.safe_dump({"budget_mib": args.budget_mib, "load_wait_s": args.load_wait_s,
                                    "models": entries}, sort_keys=False))
    return path


def resident(server: ServerProcess) -> set[str]:
    return {m["root"] for m in listing(server).values() if m["state"] == "resident"}


def device_used() -> int:
    from loadtest.footprint import gpu_used_bytes

    return gpu_used_bytes(1)


def listing(server: ServerProcess) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}


def churn_order(names: list[str], planned: dict[str, float], rounds: int = 2) -> list[str]:
    """Largest, smallest, second largest, second smallest, ...: each request pushes out the last one."""
    by_size = sorted(names, key=lambda n: -planned[n])
    order = []
    for i in range((len(by_size) + 1) // 2):
        order.append(by_size[i])
        if len(by_size) - 1 - i != i:
            order.append(by_size[len(by_size) - 1 - i])
    return order * rounds


def run(args: argparse.Namespace) -> Results:
    from server.gateway.models.memory_plan import where_models_run
    from server.gateway.models.models_file import load_models_file

    wall = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    models: dict[str, str | None] = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        models[name] = str(Path(path).resolve()) if path else None
    file = models_file(args, models)
    on_gpu = where_models_run(load_models_file(file).models).on_gpu
    settings = {"n_ctx": args.n_ctx, "n_parallel": args.n_parallel, "backend": args.backend,
                "max_tokens": args.max_tokens}
    res = Results(machine=args.machine or platform.processor() or platform.machine(), on_gpu=on_gpu,
                  budget_mib=args.budget_mib, settings=settings)
    server = start_edgeserve(["--models", str(file)], args.work / "serve.log").wait_ready(timeout_s=300)
    client = httpx.Client(base_url=server.url, timeout=600, trust_env=False)
    try:
        res.planned_mib = {n: m["planned_memory_mib"] for n, m in listing(server).items()}
        # cold: each model loads; the process that appeared holds its memory
        for name in models:
            before, resident_before = descendants(server.pid), resident(server)
            used_before = device_used() if on_gpu else 0
            request = stream(client, name, args.max_tokens, "cold")
            res.requests.append(request)
            res.cold_ttft_s[name] = request.ttft_s if request.ttft_s is not None else float("nan")
            time.sleep(args.settle_s)
            now = descendants(server.pid)
            memory = process_memory(now | {server.pid}, on_gpu)
            new = now - before - {server.pid}
            if any(p in memory for p in new) or not on_gpu:
                res.measured_mib[name] = sum(memory.get(p, 0) for p in new) / MIB
                res.memory_method = "NVML per-process GPU memory" if on_gpu else "RSS"
            else:
                # NVML shows no process here (a container): the card's used memory before and after, plus
                # what the models evicted on the way held when they were measured.
                evicted = resident_before - resident(server)
                delta = (device_used() - used_before) / MIB
                res.measured_mib[name] = delta + sum(res.measured_mib.get(e, 0.0) for e in evicted)
                res.memory_method = "the GPU's used memory before and after each load"
            if on_gpu and server.pid in memory:
                res.gateway_mib = memory[server.pid] / MIB
        # churn: loads and evictions one after another
        for name in churn_order(list(models), res.planned_mib):
            res.requests.append(stream(client, name, args.max_tokens, "churn"))
        # burst: every model asked for at once, twice
        with ThreadPoolExecutor(2 * len(models)) as pool:
            res.requests += list(pool.map(lambda n: stream(client, n, args.max_tokens, "burst"),
                                          list(models) * 2))
        # warm: each model resident, then --warm requests
        for name in models:
            res.requests.append(stream(client, name, 4, "warm-up"))
            warm = [stream(client, name, args.max_tokens, "warm") for _ in range(args.warm)]
            res.requests += warm
            res.warm[name] = warm_figures(warm)
        page = httpx.get(server.url + "/metrics", timeout=30).text
        for name in models:
            res.loads[name] = metric_value(page, "edgeserve_model_loads_total", model=name)
            res.evictions[name] = metric_value(page, "edgeserve_model_evictions_total", model=name)
            count = metric_value(page, "edgeserve_model_load_seconds_count", model=name)
            total = metric_value(page, "edgeserve_model_load_seconds_sum", model=name)
            res.load_seconds[name] = total / count if count else float("nan")
        res.oom = int(metric_value(page, "edgeserve_model_load_failures_total"))
    finally:
        server.stop()
    res.oom += len(OOM.findall((args.work / "serve.log").read_text(errors="replace")))
    # the baseline: each model alone, same settings, same requests
    for name, path in models.items():
        if args.backend == "embedded":
            flags = ["--n-ctx", str(args.n_ctx), "--n-parallel", str(args.n_parallel)]
            flags += ["--model-path", path] if path else []
            flags += ["--n-threads", str(args.n_threads)] if args.n_threads else []
        else:  # one llama-server behind the gateway, started and supervised as the pool starts it
            flags = ["--models", str(models_file(args, {name: path}))]
        log = args.work / f"single-{name}.log"
        single = start_edgeserve(flags, log).wait_ready(timeout_s=300)
        alone = httpx.Client(base_url=single.url, timeout=600, trust_env=False)
        try:
            served = name if args.backend != "embedded" else "edgeserve"
            stream(alone, served, 4, "single-warm-up")
            res.single[name] = warm_figures([stream(alone, served, args.max_tokens, "single")
                                             for _ in range(args.warm)])
        finally:
            single.stop()
        res.oom += len(OOM.findall(log.read_text(errors="replace")))
    res.wall_s = time.monotonic() - wall
    return res


def markdown(res: Results, command: str) -> str:
    answered = sum(r.ok for r in res.requests)
    lines = [f"Command: `{command}`", "",
             f"Machine: {res.machine}; memory measured as {res.memory_method}"
             f"; budget {res.budget_mib} MiB; settings {res.settings}; wall {res.wall_s:.0f} s", "",
             f"Requests answered: {answered} of {len(res.requests)}; out of memory: {res.oom}", "",
             "| model | planned MiB | measured MiB | measured/planned | cold TTFT s | load s | loads "
             "| evictions | warm TTFT s | warm tok/s | alone TTFT s | alone tok/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, planned in res.planned_mib.items():
        measured = res.measured_mib.get(name, float("nan"))
        warm, alone = res.warm.get(name, {}), res.single.get(name, {})
        nan = float("nan")
        lines.append(
            f"| {name} | {planned:,.1f} | {measured:,.1f} | {measured / planned - 1:+.1%} "
            f"| {res.cold_ttft_s.get(name, nan):.2f} | {res.load_seconds.get(name, nan):.2f} "
            f"| {res.loads.get(name, 0):.0f} | {res.evictions.get(name, 0):.0f} "
            f"| {warm.get('ttft_median_s', nan):.3f} | {warm.get('decode_tokens_per_s', nan):.1f} "
            f"| {alone.get('ttft_median_s', nan):.3f} | {alone.get('decode_tokens_per_s', nan):.1f} |")
    if res.gateway_mib is not None:
        lines += ["", f"The gateway process itself holds {res.gateway_mib:,.0f} MiB of GPU memory "
                  "(no model's)."]
    failed = [r for r in res.requests if not r.ok]
    if failed:
        lines += ["", "Not answered:"] + [f"- {r.phase} {r.model}: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write the synthetic models")
    mk.add_argument("--work", type=Path, required=True)
    mk.add_argument("--presets", default="llama32-1b,llama32-3b,llama31-8b")
    mk.add_argument("--level", default="Q4_K_M")
    mk.add_argument("--vocab", type=Path, default=None, help="tokenizer GGUF (default: the bundled model's)")
    rn = sub.add_parser("run", help="serve the models and measure")
    rn.add_argument("--model", action="append", required=True,
                    help="NAME=PATH, or NAME alone: the bundled model")
    rn.add_argument("--work", type=Path, required=True, help="models file and server logs")
    rn.add_argument("--out", type=Path, required=True, help="multi_model.json and multi_model.md")
    rn.add_argument("--budget-mib", type=int, default=8192, help="the models file's budget_mib (a P4: 8192)")
    rn.add_argument("--backend", default="embedded", choices=["embedded", "llama-server"])
    rn.add_argument("--n-ctx", type=int, default=4096)
    rn.add_argument("--n-parallel", type=int, default=2)
    rn.add_argument("--n-threads", type=int, default=None)
    rn.add_argument("--max-tokens", type=int, default=64)
    rn.add_argument("--warm", type=int, default=5, help="warm requests per model (and per baseline)")
    rn.add_argument("--load-wait-s", type=float, default=300.0)
    rn.add_argument("--settle-s", type=float, default=0.5, help="pause before memory is read after a load")
    rn.add_argument("--machine", default=None, help="what to call this machine in the results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "make":
        make(args)
        return
    res = run(args)
    command = "python bench/multi_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "multi_model.json").write_text(json.dumps(asdict(res), indent=2) + "\n")
    text = markdown(res, command)
    (args.out / "multi_model.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
