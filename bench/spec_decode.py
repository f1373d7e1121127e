"""Speculative decoding, side by side in one run: `edgeserve serve` with speculation off, with prompt lookup
(ngram-simple) and, where a draft model is given, with it (draft-simple), against llama-server with its n-gram
modes (and without speculation), on the same model, prompts, stream counts and greedy settings.

Every server is started once and runs for the whole measurement; they take turns slice by slice (a slice:
one request per stream, all at once, on the shipped prompts bench/data/spec_prompts.jsonl: repeat or edit
given text and code), in alternating order, greedy, max_tokens fixed. tokens/s = completion tokens / the
time the server's slices took.
edgeserve's texts with speculation are checked against its texts without it (the same prompt, stream count
and round): greedy output must be identical. With one KV pool (the default with several slots) a sequence's
logits depend on what shares its step, and drafts change that, so above one stream a near-tie may differ.
edgeserve's drafted/accepted counts come from its /metrics.

CPU (the bundled SmolLM2-135M):
    python bench/spec_decode.py --levels 1,8 --threads 2 --out OUT
GPU (one H100; synthetic models made with `python -m quantize.synthetic --preset llama31-8b|llama32-1b
--vocab-from VOCAB.gguf` and `llama-quantize ... Q4_K_M`; random weights, so only the cost is measured):
    python bench/spec_decode.py --gpu --model 8B.gguf --draft-model 1B.gguf --levels 1,32 --rounds 2 \\
        --max-tokens 64 --llama-modes '' --budget-s 150 --work WORK --out OUT
Writes OUT/spec_decode.json and OUT/spec_decode.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.servers import ServerProcess, free_port, metric_values, spawn, start_edgeserve  # noqa: E402

PROMPTS = REPO / "bench" / "data" / "spec_prompts.jsonl"
LLAMA_MODES = ("none", "ngram-simple", "ngram-map-k", "ngram-mod")


@dataclass(frozen=True)
class Server:
    """One configuration under test: how to start it."""

    name: str  # edgeserve-off, edgeserve-ngram, edgeserve-draft, llama-server-<mode>
    argv: tuple[str, ...]
    is_edgeserve: bool


@dataclass
class Run:
    server: str
    level: int
    round: int
    tokens: int = 0
    seconds: float = 0.0
    requests: int = 0
    drafted: float = 0.0
    accepted: float = 0.0
    texts: dict[str, str] = field(default_factory=dict)  # prompt id (and stream) -> text
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _llama_server() -> str | None:
    beside = Path(sys.prefix) / "bin" / "llama-server"
    return str(beside) if beside.is_file() else shutil.which("llama-server")


def servers(args: argparse.Namespace, n_parallel: int) -> list[Server]:
    # No prefix cache: a prompt taken from the cache computes only its last token, in a batch of its own,
    # which can change a greedy token by itself (bits of a logit on this CPU); the identity check needs every
    # prompt computed alike, and every request here computes its whole prompt in every configuration.
    common = ["--n-parallel", str(n_parallel), "--n-ctx", str(args.n_ctx), "--no-prefix-cache"]
    if args.threads:
        common += ["--n-threads", str(args.threads)]
    if not args.gpu:
        common += ["--n-gpu-layers", "0"]
    if args.model:
        common += ["--model-path", args.model]
    spec = ["--spec-draft-n-max", str(args.draft_max)]
    out = [Server("edgeserve-off", tuple(common), True),
           Server("edgeserve-ngram", (*common, "--spec-type", "ngram-simple", *spec), True)]
    if args.draft_model:
        out.append(Server("edgeserve-draft", (*common, "--spec-type", "draft-simple", "--spec-draft-model",
                                              args.draft_model, *spec), True))
    binary = _llama_server()
    modes = [m for m in args.llama_modes.split(",") if m]
    if binary is not None and args.llama_modes:
        model = args.model or _bundled()
        for mode in modes:
            argv = [binary, "-m", model, "-c", str(args.n_ctx * n_parallel), "-np", str(n_parallel),
                    "-ngl", "99" if args.gpu else "0", "--no-webui"]
            if args.threads:
                argv += ["-t", str(args.threads), "-tb", str(args.threads)]
            if mode != "none":
                argv += ["--spec-type", mode]
            out.append(Server(f"llama-server-{mode}", tuple(argv), False))
    return out


def _bundled() -> str:
    from quantize.bundled import default_model_path

    return str(default_model_path())


def start(server: Server, logs: Path) -> ServerProcess:
    log = logs / f"{server.name}.log"
    if server.is_edgeserve:
        return start_edgeserve(server.argv, log).wait_ready(timeout_s=600)
    port = free_port()
    proc = spawn([*server.argv, "--host", "127.0.0.1", "--port", str(port)], log, port, server.name)
    return proc.wait_ready("/health", timeout_s=600)


async def _one(client: httpx.AsyncClient, url: str, server: Server, prompt: dict, max_tokens: int,
               run: Run, key: str) -> None:
    body = {"model": "edgeserve" if server.is_edgeserve else "m", "messages": prompt["messages"],
            "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
    if not server.is_edgeserve:
        body["cache_prompt"] = False  # as edgeserve here (no prefix cache): every request computes its prompt
    r = await client.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    data = r.json()
    run.tokens += int(data["usage"]["completion_tokens"])
    run.requests += 1
    run.texts[key] = data["choices"][0]["message"]["content"] or ""


async def measure_slice(proc: ServerProcess, server: Server, level: int, prompts: list[dict], first: int,
                        args: argparse.Namespace, run: Run) -> None:
    """`level` requests at once (prompts first, first+1, ...), timed; counts added to `run`."""
    before = metric_values(proc.url) if server.is_edgeserve else {}
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=level + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(_one(client, proc.url, server, prompts[(first + i) % len(prompts)],
                                    args.max_tokens, run, f"{run.round}/{first + i}")
                               for i in range(level)))
        run.seconds += time.perf_counter() - t0
    if server.is_edgeserve:
        after = metric_values(proc.url)
        for attr, name in (("drafted", "edgeserve_spec_drafted_tokens_total"),
                           ("accepted", "edgeserve_spec_accepted_tokens_total")):
            setattr(run, attr, getattr(run, attr) + after.get(name, 0.0) - before.get(name, 0.0))


async def warm(proc: ServerProcess, server: Server, prompts: list[dict]) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        body = {"model": "edgeserve" if server.is_edgeserve else "m", "messages": prompts[0]["messages"],
                "max_tokens": 8, "temperature": 0.0}
        (await client.post(proc.url + "/v1/chat/completions", json=body)).raise_for_status()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="target GGUF (default: the bundled SmolLM2-135M)")
    ap.add_argument("--draft-model", help="draft GGUF for edgeserve's draft-simple (same vocabulary)")
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--levels", default="1,8", help="concurrent streams, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per stream count and round (default: one per prompt, at least one per "
                         "stream)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over all servers, order alternating")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads of every server (0: their default)")
    ap.add_argument("--gpu", action="store_true", help="every layer on the GPU")
    ap.add_argument("--n-ctx", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--draft-max", type=int, default=8, help="edgeserve's --spec-draft-n-max")
    ap.add_argument("--llama-modes", default=",".join(LLAMA_MODES),
                    help="llama-server --spec-type modes to run ('none': without speculation; empty: no "
                         "llama-server)")
    ap.add_argument("--only", default="", help="run only these servers (names, comma-separated)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no new measurement after this many seconds of measuring")
    ap.add_argument("--work", default="", help="folder for server logs (default: OUT/logs)")
    ap.add_argument("--out", required=True, help="folder for spec_decode.json and spec_decode.md")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    prompts = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    out = Path(args.out)
    logs = Path(args.work) / "logs" if args.work else out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = servers(args, max(levels))
    if args.only:
        keep = set(args.only.split(","))
        todo = [s for s in todo if s.name in keep]
    # Every server runs for the whole measurement and they take turns slice by slice (a slice: one request
    # per stream, all at once), in alternating order: on a shared or throttling machine each sees the same
    # background, and no server runs while another is measured.
    procs: dict[str, ServerProcess] = {}
    runs: dict[tuple[str, int, int], Run] = {}
    t_start = time.monotonic()
    try:
        for server in todo:
            procs[server.name] = start(server, logs)
            asyncio.run(warm(procs[server.name], server, prompts))
        t_start = time.monotonic()
        for rnd in range(args.rounds):
            for level in levels:
                n_requests = args.requests or len(prompts)
                for j in range(max(1, n_requests // level)):
                    if args.budget_s and time.monotonic() - t_start > args.budget_s:
                        print(f"budget spent: round {rnd}, {level} streams, slice {j} on not run",
                              file=sys.stderr)
                        break
                    order = todo if (j + rnd) % 2 == 0 else list(reversed(todo))
                    for server in order:
                        run = runs.setdefault((server.name, level, rnd), Run(server.name, level, rnd))
                        asyncio.run(measure_slice(procs[server.name], server, level, prompts, j * level, args,
                                                  run))
                for server in todo:
                    run = runs.get((server.name, level, rnd)) or Run(server.name, level, rnd)
                    print(f"{server.name:26s} streams {level:3d} round {rnd}: {run.tokens_per_s:8.1f} t/s "
                          f"({run.tokens} tokens, {run.seconds:.1f} s, drafted {run.drafted:.0f}, "
                          f"accepted {run.accepted:.0f})", file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
    write(out, args, levels, list(runs.values()), time.monotonic() - t_start)
    return 0


def _identical(runs: list[Run], name: str, level: int) -> str:
    """Whether `name`'s texts equal edgeserve-off's at `level` (every round): yes, or how many differ."""
    base = {k: v for r in runs if r.server == "edgeserve-off" and r.level == level
            for k, v in r.texts.items()}
    mine = [(k, v) for r in runs if r.server == name and r.level == level for k, v in r.texts.items()]
    if not base or not mine:
        return "n/a"
    differ = sum(1 for k, v in mine if base.get(k) != v)
    return "yes" if differ == 0 else f"no ({differ} of {len(mine)} differ)"


def write(out: Path, args: argparse.Namespace, levels: list[int], runs: list[Run], seconds: float) -> None:
    names = list(dict.fromkeys(r.server for r in runs))
    rows = []
    for name in names:
        for level in levels:
            mine = [r for r in runs if r.server == name and r.level == level]
            if not mine:
                continue
            tps = statistics.median(r.tokens_per_s for r in mine)
            drafted = sum(r.drafted for r in mine)
            accepted = sum(r.accepted for r in mine)
            base = [r.tokens_per_s for r in runs if r.server == "edgeserve-off" and r.level == level]
            rows.append({
                "server": name, "streams": level, "tokens_per_s": round(tps, 2),
                "rounds": [round(r.tokens_per_s, 2) for r in mine],
                "vs_edgeserve_off": round(tps / statistics.median(base), 3) if base else None,
                "acceptance": round(accepted / drafted, 3) if drafted else None,
                "identical_to_off": _identical(runs, name, level) if name.startswith("edgeserve-") else "",
            })
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
              "args": vars(args), "cpu_count": os.cpu_count(), "seconds": round(seconds, 1), "rows": rows,
              "runs": [{k: v for k, v in asdict(r).items() if k != "texts"} | {"tokens_per_s": r.tokens_per_s}
                       for r in runs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec_decode.json").write_text(json.dumps(result, indent=2))
    lines = ["| server | streams | tokens/s (median) | rounds | vs edgeserve off | acceptance "
             "| greedy text = off |", "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        vs = f"{r['vs_edgeserve_off']:.2f}x" if r["vs_edgeserve_off"] is not None else ""
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else ""
        rounds = ", ".join(f"{x:.1f}" for x in r["rounds"])  # type: ignore[attr-defined]
        lines.append(f"| {r['server']} | {r['streams']} | {r['tokens_per_s']:.1f} | {rounds} | {vs} | {acc} "
                     f"| {r['identical_to_off']} |")
    (out / "spec_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
