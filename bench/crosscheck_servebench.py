"""The tuner's Locust measurement against an outside load tool: servebench (PyPI, pinned in setup_env.sh
test) and the tuner's Locust run measure the same `edgeserve serve` setting, one after the other, with the
same request shape (streamed chat, the shipped prompts, fixed output length, EOS ignored, greedy), the same
number of concurrent clients and the same duration; the script reports both tools' output tokens/s and TTFT
p50/p90 and their differences. Runs on the CPU (bundled model) or a GPU host (--model-path).

    python bench/crosscheck_servebench.py --n-parallel 2 --duration 60 --rounds 2 --out results/crosscheck
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.prompts import fresh, select  # noqa: E402
from loadtest.runner import run_locust, warm_up  # noqa: E402
from loadtest.selection import Load  # noqa: E402
from loadtest.servers import metric_value, start_edgeserve  # noqa: E402
from loadtest.summary import percentile  # noqa: E402
from loadtest.workload import Workload, parse_lengths  # noqa: E402

# servebench draws from the file with replacement: enough distinct tagged prompts that it rarely repeats one.
PROMPTS_IN_FILE = 2000


def servebench(url: str, model: str, prompts: Path, users: int, duration: int, max_tokens: int,
               out: Path) -> dict[str, Any]:
    """One servebench level (closed loop, `users` in flight) against `url`; its summary."""
    cmd = [str(Path(sys.executable).with_name("servebench")), "run", "--url", f"{url}/v1", "--model", model,
           "--concurrency", str(users), "--duration", str(duration), "--prompts", str(prompts),
           "--output-len", str(max_tokens), "--temperature", "0", "--warmup", "1", "--no-gpu",
           "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=duration + 600)
    level = json.loads(out.read_text())["levels"][0]
    s = level["summary"]
    return {"completed": s["completed"], "failed": s["failed"], "tokens_per_s": s["output_throughput"],
            "steady_tokens_per_s": s.get("steady_state_output_throughput"),
            # servebench's run.json holds times in seconds
            "ttft_p50_ms": s["ttft"]["p50"] * 1000, "ttft_p90_ms": s["ttft"]["p90"] * 1000,
            "duration_s": level["duration"]}


def locust(url: str, workload: Workload, users: int, duration: int, out: Path) -> dict[str, Any]:
    s = run_locust(url, load=Load(users=users), duration_s=duration, workload=workload, trial_dir=out,
                   drain_s=120)
    return {"completed": s.requests_ok, "failed": s.requests_failed, "tokens_per_s": s.tokens_per_s,
            "ttft_p50_ms": s.ttft_p50_ms, "ttft_p90_ms": percentile(s.ttft_ms, 90),
            "duration_s": s.duration_s}


SERVER_FIGURES = ("edgeserve_time_to_first_token_seconds_sum", "edgeserve_time_to_first_token_seconds_count",
                  "edgeserve_prompt_tokens_total", "edgeserve_generation_tokens_total")


def server_figures(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {name: metric_value(text, name) for name in SERVER_FIGURES}


def server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """What the server itself saw during one tool's run: its own TTFT and the prompts' length."""
    d = {k: after[k] - before[k] for k in SERVER_FIGURES}
    n = d["edgeserve_time_to_first_token_seconds_count"]
    return {"server_ttft_mean_ms": d["edgeserve_time_to_first_token_seconds_sum"] / n * 1000 if n else None,
            "server_prompt_tokens_per_request": d["edgeserve_prompt_tokens_total"] / n if n else None,
            "server_generated_tokens": d["edgeserve_generation_tokens_total"]}


def diff(a: float | None, b: float | None) -> float | None:
    """(servebench - locust) / locust."""
    return None if not a or b is None else (b - a) / a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-parallel", type=int, default=2, help="server slots = clients of both tools")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--duration", type=int, default=60, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of both tools, alternating the order")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-lengths", default="medium", help="similar lengths: less noise per request")
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("crosscheck"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    # Both tools send the same prompts: the shipped ones of these lengths, each behind a tag of its own (as
    # the locustfile sends them: no prefix-cache hits), drawn at random; servebench reads them from a file.
    prompts = select(parse_lengths(args.prompt_lengths), args.max_prompt_tokens)
    rng = random.Random()
    prompt_file = args.out / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": fresh(rng.choice(prompts), rng)}) + "\n"
                                   for _ in range(PROMPTS_IN_FILE)))
    # servebench sends temperature 0 and no top_p: the same here.
    workload = Workload(mix="chat-stream", prompt_lengths=args.prompt_lengths,
                        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, temperature=0.0,
                        top_p=None)
    serve_args = ["--n-parallel", str(args.n_parallel), "--n-ctx", str(args.n_ctx)]
    if args.n_threads:
        serve_args += ["--n-threads", str(args.n_threads)]
    if args.model_path:
        serve_args += ["--model-path", args.model_path]
    server = start_edgeserve(serve_args, args.out / "server.log").wait_ready(timeout_s=600)
    rows: list[dict[str, Any]] = []
    try:
        warm_up(server.url, workload, 2)
        model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for r in range(args.rounds):
            # Alternate which tool goes first, so that a drift in the machine's load favours neither.
            for tool in ("locust", "servebench") if r % 2 == 0 else ("servebench", "locust"):
                where = args.out / f"round{r + 1}_{tool}"
                started = time.time()
                before = server_figures(server.url)
                if tool == "locust":
                    row = locust(server.url, workload, args.n_parallel, args.duration, where)
                else:
                    where.mkdir(parents=True, exist_ok=True)
                    row = servebench(server.url, model, prompt_file, args.n_parallel, args.duration,
                                     args.max_tokens, where / "run.json")
                row |= server_side(before, server_figures(server.url))
                rows.append({"round": r + 1, "tool": tool, "started": started, **row})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    loc = [r for r in rows if r["tool"] == "locust"]
    sb = [r for r in rows if r["tool"] == "servebench"]

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    summary = {key: {"locust": mean([r[key] for r in loc]), "servebench": mean([r[key] for r in sb])}
               for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "server_ttft_mean_ms",
                           "server_prompt_tokens_per_request")}
    for figures in summary.values():
        figures["difference"] = diff(figures["locust"], figures["servebench"])
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "summary": summary}
    (args.out / "crosscheck.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
