"""Serving throughput, side by side in one run: (a) `edgeserve serve` (embedded engine), (b) llama-server with
-np = concurrency, (c) llama-cpp-python's own server; same model, same prompts, plus llama-bench tg128.

Each request: a prompt of --prompt-tokens tokens (distinct per request, so no server can share a prefix),
--gen-tokens generated tokens with EOS ignored, greedy, streamed. For every concurrency C, C streams run at
once, each sending --rounds requests back to back (so that in later rounds the streams overlap in steady
state). Two figures per level: aggregate t/s = generated tokens of all requests / wall time (prefill
included), and decode t/s = the sum over streams of their decode rates, a request's decode rate being
(tokens - 1) / (last - first content chunk): steady-state generation speed, the figure to hold against
llama-bench tg at 1 stream. Decode t/s is computed as decode tokens (all but each request's first) / time
during which at least one request was decoding, which is that sum where streams decode side by side and
the single-stream rate where a server takes them in turn. Also TTFT (time to the first content chunk).

GPU host (KIT: the CUDA llama.cpp build and its Python wheels): python bench/serving_compare.py --kit KIT \
    --synthetic llama31-8b --wheels WHEELS --write-doc
CPU: python bench/serving_compare.py            (bundled SmolLM2, 1/4/8 streams, (a) and (c) only)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from serving_report import section, write_doc
from serving_servers import REPO, Server, build_model, device_name, kit_env, sh, start

# Words that are one token in both the Llama-3 and the SmolLM2 vocabularies (with their leading space).
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out more"
)
WORDS = _WORDS.split()


@dataclass
class Sample:
    """One streamed request: when its first and last content chunks came, and how many tokens it generated."""

    stream: int
    round: int
    prompt_tokens: int | None  # from the usage chunk; None where the server sends none when streaming
    generated_tokens: int
    is_usage_counted: bool  # tokens from the usage chunk, else one per content chunk
    start_s: float  # sent at, from the start of the level
    ttft_s: float
    decode_s: float  # first to last content chunk
    decode_tokens_per_s: float | None = field(init=False)

    def __post_init__(self) -> None:
        n = self.generated_tokens - 1
        self.decode_tokens_per_s = n / self.decode_s if n > 0 and self.decode_s > 0 else None


@dataclass
class Run:
    server: str
    concurrency: int
    requests: int
    generated_tokens: int
    prompt_tokens_mean: float | None
    wall_s: float
    errors: int
    samples: list[Sample]
    tokens_per_s: float = field(init=False)
    ttft_p50_s: float | None = field(init=False)
    ttft_p90_s: float | None = field(init=False)
    decode_rate_sum_tokens_per_s: float | None = field(init=False)
    decode_tokens_per_s: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.tokens_per_s = self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0
        ttfts = [s.ttft_s for s in self.samples]
        self.ttft_p50_s = _quantile(ttfts, 0.5)
        self.ttft_p90_s = _quantile(ttfts, 0.9)
        # Each stream's mean decode rate over its rounds, summed over streams: steady-state speed only where
        # the server really decodes the streams together; a server that serializes them scores C x its
        # single-stream rate here, so it stays in the JSON only.
        per_stream: dict[int, list[float]] = {}
        for s in self.samples:
            if s.decode_tokens_per_s is not None:
                per_stream.setdefault(s.stream, []).append(s.decode_tokens_per_s)
        rates = [statistics.fmean(v) for v in per_stream.values()]
        self.decode_rate_sum_tokens_per_s = sum(rates) if rates else None
        # The reported figure: decode tokens (all but each request's first) / time during which at least one
        # request was decoding. Equal to the sum above when the streams decode side by side, and to the
        # single-stream rate when they take turns.
        spans = sorted(
            (s.start_s + s.ttft_s, s.start_s + s.ttft_s + s.decode_s) for s in self.samples if s.decode_s > 0
        )
        busy_s, end = 0.0, float("-inf")
        for lo, hi in spans:
            busy_s += max(0.0, hi - max(lo, end))
            end = max(end, hi)
        decoded = sum(s.generated_tokens - 1 for s in self.samples if s.decode_s > 0)
        self.decode_tokens_per_s = decoded / busy_s if busy_s > 0 else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- load ---------------------------------------------------------------------------------------------------


def make_prompt(i: int, n_words: int) -> str:
    rng = random.Random(i)
    return f"Request {i:06d}:" + "".join(" " + rng.choice(WORDS) for _ in range(n_words))


async def _request(
    client: httpx.AsyncClient,
    url: str,
    prompt: str,
    gen: int,
    stream: int = 0,
    rnd: int = 0,
    origin: float = 0.0,
) -> Sample:
    """One streamed completion. Tokens come from the usage chunk where the server sends one (edgeserve, on
    request; llama-server), else one per non-empty content chunk (llama-cpp-python sends one per token)."""
    body = {
        "prompt": prompt,
        "max_tokens": gen,
        "temperature": 0,
        "ignore_eos": True,
        "min_tokens": gen,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = 0
    finish = False
    usage: dict[str, Any] | None = None
    t_first = t_last = 0.0
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments (pings)
            data = line[5:].strip()
            if data == "[DONE]":
                # Read on to the end of the body rather than drop the connection: a server that sees the
                # client gone may take a while to notice and free its slot.
                continue
            payload = json.loads(data)
            if "error" in payload:
                raise ValueError(f"error in stream: {payload['error']}")
            if payload.get("usage"):
                usage = payload["usage"]
            choices = payload.get("choices") or ()
            finish = finish or any(c.get("finish_reason") for c in choices)
            if any(c.get("text") for c in choices):
                t_last = time.perf_counter()
                if chunks == 0:
                    t_first = t_last
                chunks += 1
    if chunks == 0 or not finish:
        # e.g. llama-cpp-python's server cuts a stream with a bare [DONE] when interrupt_requests is on
        raise ValueError(f"stream ended without a finish_reason after {chunks} content chunks")
    return Sample(
        stream,
        rnd,
        int(usage["prompt_tokens"]) if usage else None,
        int(usage["completion_tokens"]) if usage else chunks,
        usage is not None,
        t0 - origin,
        t_first - t0,
        t_last - t_first,
    )


async def load(server: Server, c: int, rounds: int, n_words: int, gen: int, seed: int) -> Run:
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await _request(client, server.url, make_prompt(seed - 1, n_words), 8)  # warm-up

        t0 = time.perf_counter()

        async def stream(k: int) -> list[Sample | BaseException]:
            out: list[Sample | BaseException] = []
            for r in range(rounds):
                prompt = make_prompt(seed + k * rounds + r, n_words)
                try:
                    out.append(await _request(client, server.url, prompt, gen, k, r, t0))
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    out.append(exc)
            return out

        results = [x for per in await asyncio.gather(*(stream(k) for k in range(c))) for x in per]
        wall = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, Sample)]
    for err in results:
        if not isinstance(err, Sample):
            print(f"  {server.name}: request failed: {err!r}")
    prompts = [s.prompt_tokens for s in ok if s.prompt_tokens is not None]
    return Run(
        server.name,
        c,
        len(results),
        sum(s.generated_tokens for s in ok),
        sum(prompts) / len(prompts) if prompts else None,
        wall,
        len(results) - len(ok),
        ok,
    )


def summary(run: Run) -> str:
    def num(v: float | None, scale: float = 1.0) -> str:
        return f"{v * scale:.1f}" if v is not None else "?"

    return (
        f"{run.server:17s} streams {run.concurrency:3d}: {run.tokens_per_s:8.1f} t/s, decode "
        f"{num(run.decode_tokens_per_s)} t/s, TTFT p50 {num(run.ttft_p50_s, 1000)} ms "
        f"({run.generated_tokens} tokens in {run.wall_s:.1f} s, prompt {num(run.prompt_tokens_mean)} tokens, "
        f"{run.errors} errors)"
    )


def calibrate_words(server: Server, target: int) -> int:
    """Words per prompt so that prompts come out at `target` tokens on this tokenizer."""
    n = target - 4
    for _ in range(4):
        r = httpx.post(
            server.url + "/v1/completions", json={"prompt": make_prompt(0, n), "max_tokens": 1}, timeout=120
        )
        got = int(r.json()["usage"]["prompt_tokens"])
        if got == target:
            break
        n += target - got
    return n


def llama_bench(model: Path, args: argparse.Namespace, env: dict[str, str]) -> float | None:
    if not shutil.which("llama-bench", path=env["PATH"]):
        return None
    cmd = [
        "llama-bench",
        "-m",
        str(model),
        "-p",
        "0",
        "-n",
        str(args.gen_tokens),
        "-r",
        "3",
        "-o",
        "json",
        "-ngl",
        "99" if args.gpu else "0",
    ]
    if args.gpu:
        cmd += ["-fa", "1"]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    out = sh(cmd, env, capture_output=True)
    rows = json.loads(out.stdout)
    return float(rows[0]["avg_ts"]) if rows else None


# --- report -------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, help="GGUF to serve (default: --synthetic, else the bundled SmolLM2)"
    )
    p.add_argument("--synthetic", help="build this quantize.synthetic preset as Q4_K_M (e.g. llama31-8b)")
    p.add_argument(
        "--vocab", type=Path, help="tokenizer for --synthetic (default: KIT/ggml-vocab-llama-bpe.gguf)"
    )
    p.add_argument("--kit", type=Path, help="GPU kit folder (CUDA llama.cpp tarball and wheels)")
    p.add_argument("--wheels", type=Path, help="extra wheels for the host (typer, rich, sse-starlette, ...)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeserve-bench")
    p.add_argument("--concurrency", default=None, help="comma list (GPU 1,4,16,64; CPU 1,4,8)")
    p.add_argument("--servers", default=None, help="subset of a,b,c (default: all found)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument(
        "--rounds", type=int, default=2, help="requests per stream, back to back (so streams overlap)"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every server")
    p.add_argument("--cpu", action="store_true", help="no GPU even if one is present")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="JSON goes here")
    p.add_argument("--write-doc", action="store_true", help="append the section to docs/BENCHMARKS.md")
    p.add_argument("--from-json", type=Path, help="no run: the section of an earlier serving_compare.json")
    args = p.parse_args()
    if args.from_json is not None:
        text = section(json.loads(args.from_json.read_text()))
        print(text)
        if args.write_doc:
            write_doc(text)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    env = kit_env(args.kit, args.wheels, args.work)
    args.gpu = not args.cpu and shutil.which("nvidia-smi") is not None
    concurrency = [int(x) for x in (args.concurrency or ("1,4,16,64" if args.gpu else "1,4,8")).split(",")]
    if args.model is not None:
        model = args.model
    elif args.synthetic:
        vocab = args.vocab or (args.kit / "ggml-vocab-llama-bpe.gguf" if args.kit else None)
        if vocab is None:
            p.error("--synthetic needs --vocab or --kit")
        model = build_model(args.synthetic, vocab, args.work, env)
    else:
        sys.path.insert(0, str(REPO))
        from quantize.bundled import default_model_path

        model = default_model_path()
    has_llama_server = shutil.which("llama-server", path=env["PATH"]) is not None
    servers = args.servers.split(",") if args.servers else ["a", *(["b"] if has_llama_server else []), "c"]
    device = device_name()
    print(
        f"device: {device}\nmodel: {model} ({model.stat().st_size / 2**30:.2f} GiB)\nservers: {servers}, "
        f"streams: {concurrency}, prompt {args.prompt_tokens} + {args.gen_tokens} generated tokens",
        flush=True,
    )

    runs: list[Run] = []
    # llama-cpp-python's server serializes requests: one instance, up for the whole run, serves every level.
    # The levels run in turn for all servers (a, b, c at 1 stream, then at 4, ...) so that a host whose speed
    # drifts (other load, clocks) treats every server alike.
    shared = start("c", model, max(concurrency), args, env, args.work) if "c" in servers else None
    try:
        n_words = calibrate_words(shared, args.prompt_tokens) if shared is not None else None
        for level in concurrency:
            for kind in servers:
                server = shared if kind == "c" else start(kind, model, level, args, env, args.work)
                assert server is not None
                try:
                    if n_words is None:
                        n_words = calibrate_words(server, args.prompt_tokens)
                    result = asyncio.run(
                        load(server, level, args.rounds, n_words, args.gen_tokens, 1000 * level)
                    )
                    runs.append(result)
                    print(f"  {summary(result)}", flush=True)
                finally:
                    if server is not shared:
                        server.stop()
    finally:
        if shared is not None:
            shared.stop()
    tg = llama_bench(model, args, env)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "model": model.name,
        "model_bytes": model.stat().st_size,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "rounds": args.rounds,
        "streamed": True,
        "command": "python bench/serving_compare.py " + " ".join(sys.argv[1:]),
        "llama_bench_tg_tokens_per_s": tg,
        "runs": [asdict(r) for r in runs],
    }
    text = section(report)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_compare.json").write_text(json.dumps(report, indent=2))
    (args.out / "serving_compare.md").write_text(text)
    print(f"wrote {args.out / 'serving_compare.json'} and serving_compare.md")
    if args.write_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
