"""The tuner's pure parts: percentiles, summaries, workload hand-off, the shipped prompts, request bodies,
settings, SLO verdicts, goodput, the choice, the report and results.json."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from loadtest.prompts import LENGTHS, data_text, select, shipped_prompts
from loadtest.result import TuneResult, summary_json
from loadtest.runner import BenchConfig
from loadtest.search import SearchResult, Space, efficiency
from loadtest.selection import (
    Load,
    LoadPoint,
    Setting,
    Skipped,
    Slo,
    Trial,
    choose,
    expand_grid,
    goodput,
    violations,
)
from loadtest.summary import LoadSummary, Recorder, percentile
from loadtest.tuner import parse_int_list
from loadtest.workload import ENV_PREFIX, Workload, parse_mix, request_body
from server.launch.request import LaunchRequest

ROOT = Path(__file__).resolve().parents[2]


def _point(rps: float, ttft_ms: float, *, users: int = 4, rate: float | None = None, failed: int = 0,
           tokens_per_request: int = 32) -> LoadPoint:
    n = round(rps * 10)
    summary = LoadSummary(users=users, duration_s=10.0, requests_ok=n, requests_in_window=n,
                          requests_failed=failed, ttft_ms=(ttft_ms,) * 20, e2e_ms=(ttft_ms + 500,) * 20,
                          decode_tokens_per_s=(50.0,) * 20, completion_tokens=n * tokens_per_request,
                          window_tokens=n * tokens_per_request)
    return LoadPoint(load=Load(users=users, rate_rps=rate), summary=summary)


def _trial(parallel: int, rps: float, ttft_ms: float, *, n_ctx: int = 2048, failed: int = 0,
           memory: int | None = None) -> Trial:
    return Trial(setting=Setting(n_parallel=parallel, n_ctx=n_ctx),
                 points=(_point(rps, ttft_ms, failed=failed),),
                 memory_bytes=memory, predicted_bytes=memory)


def test_percentile_interpolates_like_numpy() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10.0 and percentile(values, 100) == 40.0
    assert percentile(values, 50) == 25.0 and percentile(values, 95) == pytest.approx(38.5)
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile(values, 101)


def test_recorder_summary_figures_and_json_round_trip(tmp_path: Path) -> None:
    rec = Recorder()
    rec.success(ttft_ms=100.0, e2e_ms=1100.0, completion_tokens=11, prompt_tokens=40)  # 10 tokens/s after 1st
    # Finished while draining after the stop: 5 of its 21 tokens came inside the window.
    rec.success(ttft_ms=300.0, e2e_ms=2300.0, completion_tokens=21, window_tokens=5, prompt_tokens=60)
    rec.failure("HTTP 429: queue_full")
    rec.failure("HTTP 429: queue_full")
    rec.cut_off(window_tokens=8)
    summary = rec.summary(users=3, duration_s=4.0)
    assert summary.requests_total == 4 and summary.requests_cut == 1 and summary.error_rate == 0.5
    assert summary.errors == {"HTTP 429: queue_full": 2}
    assert summary.completion_tokens == 32 and summary.prompt_tokens == 100
    assert summary.tokens_per_s == pytest.approx((11 + 5 + 8) / 4.0)  # inside the window only
    assert summary.requests_per_s == pytest.approx(0.25)  # the draining request finished outside
    assert summary.ttft_p50_ms == pytest.approx(200.0)
    assert summary.decode_tokens_per_s_p50 == pytest.approx(10.0)
    assert summary.itl_p50_ms == pytest.approx(100.0)  # 10 tokens/s: 100 ms between tokens
    path = tmp_path / "summary.json"
    summary.write(path)
    assert LoadSummary.read(path) == summary


def test_workload_round_trips_through_the_environment() -> None:
    workload = Workload(mix="chat-stream:3,completion", max_tokens=32, ignore_eos=False, model="m",
                        rate_rps=2.5, shape="step", summary_path="/tmp/s.json")
    env = workload.to_env()
    assert env[ENV_PREFIX + "MAX_TOKENS"] == "32" and env[ENV_PREFIX + "IGNORE_EOS"] == "0"
    assert env[ENV_PREFIX + "RATE_RPS"] == "2.5" and ENV_PREFIX + "API_KEY" not in env
    assert Workload.from_env(env) == workload
    assert Workload.from_env({}) == Workload()
    with pytest.raises(ValidationError, match="unknown request kind 'chat-streaming'"):
        Workload(mix="chat-streaming")
    with pytest.raises(ValidationError, match="prompt lengths huge unknown"):
        Workload(prompt_lengths="short,huge")


def test_mix_names_kinds_with_weights() -> None:
    assert parse_mix("chat-stream:3, completion") == {"chat-stream": 3, "completion": 1}
    with pytest.raises(ValueError, match="at least 1"):
        parse_mix("chat:0")


def test_shipped_prompts_are_varied_and_readable_by_outside_tools() -> None:
    prompts = shipped_prompts()
    assert {p.length for p in prompts} == set(LENGTHS)
    assert len({p.id for p in prompts}) == len(prompts)
    words = sorted(len(p.prompt.split()) for p in prompts)
    assert words[0] < 15 and words[-1] > 300  # short questions and long passages
    # servebench --prompts FILE.jsonl reads one object a line with a "prompt" field.
    assert all("prompt" in json.loads(line) for line in data_text().splitlines())
    short = select(("short",), 64)
    assert short and all(p.length == "short" and p.tokens_estimate <= 64 for p in short)
    with pytest.raises(ValueError, match="no shipped long prompt fits"):
        select(("long",), 100)


def test_request_bodies_as_openai_clients_send_them() -> None:
    rng = random.Random(0)
    prompt = shipped_prompts()[0]
    workload = Workload(max_tokens=9)
    chat = request_body(workload, "chat-stream", "smol", prompt, rng)
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert chat["ignore_eos"] is True and chat["max_tokens"] == 9 and chat["temperature"] == 0.7
    assert chat["messages"][0]["content"].endswith(prompt.prompt)
    again = request_body(workload, "chat-stream", "smol", prompt, rng)
    assert again["messages"][0]["content"] != chat["messages"][0]["content"]  # no prefix-cache hits
    plain = request_body(Workload(ignore_eos=False), "completion", "smol", prompt, rng)
    assert plain["prompt"].endswith(prompt.prompt) and plain["stream"] is False
    assert "stream_options" not in plain and "ignore_eos" not in plain and "messages" not in plain


def test_varied_sampling_gives_each_request_its_own_chain() -> None:
    rng = random.Random(1)
    workload = Workload(sampling="varied")
    prompt = shipped_prompts()[0]
    bodies = [request_body(workload, "completion-stream", "smol", prompt, rng) for _ in range(200)]
    temperatures = {b["temperature"] for b in bodies}
    assert len(temperatures) > 20 and all(0.6 <= t <= 1.1 for t in temperatures)
    for field in ("top_k", "min_p", "presence_penalty", "repeat_penalty"):
        share = sum(field in b for b in bodies) / len(bodies)
        assert 0.05 < share < 0.5, field  # some requests, never all
    fixed = request_body(Workload(), "completion", "smol", shipped_prompts()[0], rng)
    assert (fixed["temperature"], fixed["top_p"]) == (0.7, 0.95) and "top_k" not in fixed


def test_extra_long_prompts_are_two_long_ones() -> None:
    longs = {p.id: p for p in shipped_prompts() if p.length == "long"}
    xlong = select(("xlong",), 2000)
    assert len(xlong) == len(longs)
    for p in xlong:
        first, second = p.id.split("+")
        assert longs[first].prompt in p.prompt and longs[second].prompt in p.prompt
        assert p.tokens_estimate > max(longs[first].tokens_estimate, longs[second].tokens_estimate)
    assert not any(p.length == "xlong" for p in select(("short", "medium", "long", "xlong"), 700))


def test_expand_grid_orders_deduplicates_and_keeps_ubatch_within_batch() -> None:
    grid = expand_grid([4, 1, 4], [4096, 2048], [512], [256, 1024])
    assert [(s.n_parallel, s.n_ctx, s.n_ubatch) for s in grid] == [(1, 2048, 256), (4, 2048, 256),
                                                                   (1, 4096, 256), (4, 4096, 256)]
    assert Setting(n_parallel=8, n_ctx=256).n_ctx_total == 2048
    with pytest.raises(ValueError, match="at least one"):
        expand_grid([], [2048])


def test_parse_int_list() -> None:
    assert parse_int_list("1,2, 4,8", "--parallel") == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="--parallel: 'x'"):
        parse_int_list("1,x", "--parallel")
    with pytest.raises(ValueError, match="at least 1"):
        parse_int_list("0", "--ctx")


def test_violations_name_every_missed_slo() -> None:
    slo = Slo(max_ttft_p95_ms=1000.0, max_itl_p95_ms=10.0, max_error_rate=0.01)
    missed = violations(_point(2.0, 3000.0, failed=5), slo)
    assert "TTFT p95 3000 ms > 1000 ms" in missed and "ITL p95 20 ms > 10 ms" in missed
    assert any(m.startswith("error rate") for m in missed)
    assert violations(_point(2.0, 300.0), Slo(max_ttft_p95_ms=1000.0)) == ()
    assert violations(LoadPoint(load=Load(users=1), failure="boom"), slo) == ("did not run: boom",)


def test_goodput_is_the_best_rate_that_met_the_slos() -> None:
    trial = Trial(setting=Setting(n_parallel=4, n_ctx=2048),
                  points=(_point(10.0, 3000.0), _point(5.0, 800.0, rate=5.0), _point(7.5, 1200.0, rate=7.5)))
    assert goodput(trial, Slo(max_ttft_p95_ms=1000.0)) == pytest.approx(5.0)
    assert goodput(trial, Slo()) == pytest.approx(10.0)
    assert goodput(trial, Slo(max_ttft_p95_ms=100.0)) == 0.0


def test_choose_highest_goodput_and_breaks_ties_towards_the_longer_context() -> None:
    slo = Slo(max_ttft_p95_ms=1000.0)
    trials = [_trial(1, 1.5, 200.0), _trial(4, 4.0, 900.0), _trial(4, 3.9, 950.0, n_ctx=8192),
              _trial(8, 5.0, 3000.0)]
    choice = choose(trials, slo)
    assert choice.best is not None and choice.best.setting == Setting(n_parallel=4, n_ctx=8192)
    assert "the longest context, then the lowest TTFT p95 kept" in choice.reason
    assert choice.goodput_rps == pytest.approx(3.9)
    assert choose([_trial(1, 1.0, 5000.0)], slo).best is None
    assert choose([], slo).reason == "no settings were tried"
    skipped = [Skipped(setting=Setting(n_parallel=p, n_ctx=1024), why="a request needs up to 1120 tokens")
               for p in range(1, 11)]
    reason = choose([], slo, skipped).reason
    assert reason.startswith("no settings were tried: all 10 settings were skipped before starting (np1 ")
    assert "np8 ctx1024 b2048 ub512: a request needs up to 1120 tokens" in reason
    assert "np9 " not in reason and "and 2 more, listed in report.md" in reason


def test_trial_needs_points_or_a_reason() -> None:
    with pytest.raises(ValidationError, match="failure reason"):
        Trial(setting=Setting(n_parallel=1, n_ctx=1024))


def _result(tmp_path: Path) -> TuneResult:
    slo = Slo(max_ttft_p95_ms=1000.0)
    space = Space(n_parallel=(1, 2, 4), n_ctx=(2048, 8192), n_batch=(2048,), n_ubatch=(512,))
    MIB = 2**20
    trials = (_trial(1, 1.5, 200.0, memory=300 * MIB), _trial(2, 2.6, 400.0, memory=320 * MIB),
              _trial(4, 4.0, 2500.0, memory=360 * MIB), _trial(2, 2.55, 420.0, n_ctx=8192, memory=420 * MIB))
    skipped = (Skipped(setting=Setting(n_parallel=4, n_ctx=8192), why="needs 9,000 MiB, over the 8,000 MiB "
                       "budget", predicted_bytes=9000 * MIB),)
    search = SearchResult(strategy="search", trials=trials[:2] + trials[3:], skipped=skipped,
                          choice=choose(trials[:2] + trials[3:], slo))
    grid = SearchResult(strategy="grid", trials=trials, skipped=skipped, choice=choose(trials, slo))
    return TuneResult(date="2026-11-29", machine="CPU (test)", card="cpu", backend="embedded", model="m.gguf",
                      space=space, slo=slo, bench=BenchConfig(duration_s=5, out_dir=tmp_path), search=search,
                      grid=grid, efficiency=efficiency(search, grid, slo), profile_path="/x/cpu.yaml")


def test_report_has_seed_004s_tables_measured_and_both_plots(tmp_path: Path) -> None:
    from loadtest.report import write_report

    result = _result(tmp_path)
    files = write_report(result, tmp_path / "out", title="test tune")
    text = files.markdown.read_text()
    assert text.startswith("# test tune\n")
    assert "**Chosen: n_parallel 2, n_ctx 8192, n_batch 2048, n_ubatch 512**" in text
    def rows(heading: str) -> list[list[str]]:
        section = text.split(heading)[1].split("##")[0]
        return [r.split("|") for r in section.splitlines() if r.startswith("|")][2:]

    assert [r[1].strip() for r in rows("## Batch Size Impact (n_parallel, at n_ctx 8192")] == ["2"]
    context = rows("## Context Length Impact (n_ctx, at n_parallel 2")
    assert [r[1].strip() for r in context] == ["2048", "8192"]
    assert [r[7].strip() for r in context] == ["320", "420"]  # memory MiB grows with the context
    assert "## Search against the grid" in text and "| Locust runs | 3 | 4 | 75% |" in text
    assert "np4 ctx8192 b2048 ub512: needs 9,000 MiB" in text
    assert len(files.plots) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files.plots)


def test_tune_result_round_trips_and_summarises(tmp_path: Path) -> None:
    result = _result(tmp_path)
    assert TuneResult.model_validate_json(result.model_dump_json()) == result
    summary = summary_json(result, {"report": "r.md"})
    assert summary["best"]["n_parallel"] == 2 and summary["best"]["n_ctx"] == 8192
    assert summary["runs"] == {"search": {"runs": 3, "starts": 3}, "grid": {"runs": 4, "starts": 4}}
    assert summary["profile"] == "/x/cpu.yaml" and summary["skipped"] == 1
    # The flags that run the winner as it was measured: the backend, the card and model only where the tune
    # named them, the searched settings and those it held fixed.
    assert summary["launch"] == ("edgeserve launch --backend embedded --n-parallel 2 --n-ctx 8192 "
                                 "--n-batch 2048 --n-ubatch 512")
    request = LaunchRequest(card="cpu", model_path="/m/my model.gguf", n_threads=1, kv_type="q8_0")
    held = result.model_copy(update={"bench": result.bench.model_copy(update={"request": request})})
    assert held.launch_argv() == (
        "edgeserve", "launch", "--backend", "embedded", "--card", "cpu", "--model-path", "/m/my model.gguf",
        "--n-parallel", "2", "--n-ctx", "8192", "--n-batch", "2048", "--n-ubatch", "512", "--n-threads", "1",
        "--kv-type", "q8_0")
    assert "'/m/my model.gguf'" in (held.launch_command() or "")
    json.dumps(summary)  # plain JSON


def _tune_cli(args: list[str], tuned: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGESERVE_TUNED_DIR": str(tuned)}
    return subprocess.run([sys.executable, "-m", "loadtest.tuner", *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False, cwd=ROOT)


def test_apply_keeps_a_finished_tunes_winner_and_forget_removes_it(tmp_path: Path) -> None:
    from loadtest.tuned import save_winner

    result = _result(tmp_path).model_copy(update={"profile_path": None})
    results = tmp_path / "results.json"
    results.write_text(result.model_dump_json())
    tuned = tmp_path / "tuned"
    proc = _tune_cli(["apply", str(results)], tuned)
    assert proc.returncode == 0, proc.stderr
    path = tuned / "cpu.yaml"
    assert f"wrote {path}" in proc.stdout and "undo: edgeserve tune forget --card cpu" in proc.stdout
    written = yaml.safe_load(path.read_text())
    assert written["tuned_by"].startswith("from edgeserve tune on 2026-11-29 (goodput ")
    assert (written["n_parallel"], written["n_ctx"], written["preferred_backend"]) == (2, 8192, "embedded")
    # What `run --save` writes: the same file, note and all.
    assert save_winner(result, tmp_path / "saved").read_text() == path.read_text()

    proc = _tune_cli(["forget", "--card", "cpu"], tuned)
    assert proc.returncode == 0 and f"removed {path}" in proc.stdout and not path.exists()
    proc = _tune_cli(["forget", "--card", "cpu"], tuned)
    assert proc.returncode == 0 and "no tuned profile for cpu" in proc.stdout


def test_apply_refuses_a_tune_without_a_winner(tmp_path: Path) -> None:
    result = _result(tmp_path)
    slo = Slo(max_ttft_p95_ms=1.0)  # nothing met it
    search = result.search.model_copy(update={"choice": choose(result.search.trials, slo)})  # type: ignore[union-attr]
    results = tmp_path / "results.json"
    results.write_text(result.model_copy(update={"search": search, "slo": slo}).model_dump_json())
    proc = _tune_cli(["apply", str(results)], tmp_path / "tuned")
    assert proc.returncode == 2
    assert "the tune chose no setting, so there is nothing to keep: none of the 3 settings met the SLOs" in (
        " ".join(proc.stderr.split()))
    assert "Traceback" not in proc.stderr and not (tmp_path / "tuned").exists()
    proc = _tune_cli(["apply", str(tmp_path / "missing.json")], tmp_path / "tuned")
    assert proc.returncode == 2 and "cannot read" in proc.stderr
