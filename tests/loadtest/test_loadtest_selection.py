"""The tuner's pure parts: percentiles, summaries, workload hand-off, setting grid, choice, report text."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from loadtest.runner import DEFAULT_SERVER_TEMPLATE, gpu_memory_used_bytes, render_command
from loadtest.selection import Constraint, Setting, Trial, choose, expand_grid, fits_request, judge
from loadtest.summary import LoadSummary, Recorder, percentile
from loadtest.tuner import TuneResult, parse_int_list
from loadtest.workload import ENV_PREFIX, Workload, chat_body, make_prompt


def _summary(tokens_per_s: float, ttft_ms: list[float], *, ok: int = 20, failed: int = 0) -> LoadSummary:
    duration_s = 10.0
    tokens = int(tokens_per_s * duration_s)
    return LoadSummary(users=4, duration_s=duration_s, requests_ok=ok, requests_in_window=ok,
                       requests_failed=failed,
                       ttft_ms=tuple(ttft_ms), e2e_ms=tuple(t + 500 for t in ttft_ms),
                       completion_tokens=tokens, window_tokens=tokens)


def _trial(parallel: int, tokens_per_s: float, ttft_p95_ms: float, *, failed: int = 0,
           n_ctx: int = 2048) -> Trial:
    # 20 equal TTFT samples make the p95 exactly the given value.
    return Trial(setting=Setting(n_parallel=parallel, n_ctx=n_ctx), users=8,
                 summary=_summary(tokens_per_s, [ttft_p95_ms] * 20, failed=failed))


def test_percentile_interpolates_like_numpy() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 50) == 25.0
    assert percentile(values, 95) == pytest.approx(38.5)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile(values, 101)


def test_recorder_summary_figures_and_json_round_trip(tmp_path: Path) -> None:
    rec = Recorder()
    rec.success(ttft_ms=100.0, e2e_ms=1100.0, completion_tokens=11)  # 10 tokens in 1 s after the first
    # Finished while draining after the stop: 5 of its 21 tokens came inside the window.
    rec.success(ttft_ms=300.0, e2e_ms=2300.0, completion_tokens=21, window_tokens=5)
    rec.failure("HTTP 429: queue_full")
    rec.failure("HTTP 429: queue_full")
    rec.cut_off(window_tokens=8)
    summary = rec.summary(users=3, duration_s=4.0)
    assert summary.requests_total == 4
    assert summary.requests_cut == 1
    assert summary.error_rate == 0.5
    assert summary.errors == {"HTTP 429: queue_full": 2}
    assert summary.completion_tokens == 32
    # Throughput counts what was generated inside the window only.
    assert summary.tokens_per_s == pytest.approx((11 + 5 + 8) / 4.0)
    assert summary.requests_in_window == 1
    assert summary.requests_per_s == pytest.approx(0.25)  # the draining request finished outside
    assert summary.ttft_p50_ms == pytest.approx(200.0)
    assert summary.decode_tokens_per_s_p50 == pytest.approx(10.0)

    path = tmp_path / "summary.json"
    summary.write(path)
    assert LoadSummary.read(path) == summary


def test_recorder_caps_distinct_error_messages() -> None:
    rec = Recorder()
    for i in range(50):
        rec.failure(f"error number {i}")
    summary = rec.summary(users=1, duration_s=1.0)
    assert summary.requests_failed == 50
    assert len(summary.errors) <= 21
    assert sum(summary.errors.values()) == 50


def test_workload_round_trips_through_the_environment() -> None:
    workload = Workload(prompt_tokens=128, max_tokens=32, stream=False, ignore_eos=False, model="m",
                        summary_path="/tmp/s.json")
    env = workload.to_env()
    assert env[ENV_PREFIX + "MAX_TOKENS"] == "32"
    assert env[ENV_PREFIX + "STREAM"] == "0"
    assert ENV_PREFIX + "API_KEY" not in env
    assert Workload.from_env(env) == workload
    assert Workload.from_env({}) == Workload()
    with pytest.raises(ValidationError):
        Workload.from_env({ENV_PREFIX + "MAX_TOKENS": "0"})


def test_chat_body_asks_for_usage_and_a_fresh_prompt() -> None:
    rng = random.Random(0)
    body = chat_body(Workload(prompt_tokens=40, max_tokens=9), "smol", rng)
    assert body["max_tokens"] == 9
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True
    prompt = body["messages"][0]["content"]
    assert 30 <= len(prompt.split()) <= 45
    assert make_prompt(40, rng) != make_prompt(40, rng)
    plain = chat_body(Workload(stream=False, ignore_eos=False), "smol", rng)
    assert "stream_options" not in plain
    assert "ignore_eos" not in plain


def test_expand_grid_orders_and_deduplicates() -> None:
    grid = expand_grid([4, 1, 2, 4], [4096, 2048])
    assert [(s.n_parallel, s.n_ctx) for s in grid] == [(1, 2048), (2, 2048), (4, 2048), (1, 4096), (2, 4096),
                                                    (4, 4096)]
    with pytest.raises(ValueError, match="at least one"):
        expand_grid([], [2048])


def test_fits_request_per_sequence() -> None:
    # n_ctx is one sequence's context, whatever the server's cache layout; the pool is n_ctx x n_parallel
    setting = Setting(n_parallel=8, n_ctx=256)
    assert setting.n_ctx_total == 2048
    assert fits_request(setting, 200)
    assert not fits_request(setting, 300)
    assert not fits_request(setting, 4000)


def test_parse_int_list() -> None:
    assert parse_int_list("1,2, 4,8", "--parallel") == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="--parallel: 'x'"):
        parse_int_list("1,x", "--parallel")
    with pytest.raises(ValueError, match="at least 1"):
        parse_int_list("0", "--ctx")
    with pytest.raises(ValueError, match="at least one"):
        parse_int_list(",", "--ctx")


def test_choose_highest_throughput_within_constraint() -> None:
    trials = [
        _trial(1, 150.0, 200.0),
        _trial(2, 260.0, 400.0),
        _trial(4, 400.0, 900.0),
        _trial(8, 520.0, 3000.0),  # fastest, but too slow to first token
    ]
    choice = choose(trials, Constraint(max_ttft_p95_ms=1000.0))
    assert choice.best is not None
    assert choice.best.setting == Setting(n_parallel=4, n_ctx=2048)
    verdict_8 = next(v for v in choice.verdicts if v.setting.n_parallel == 8)
    assert not verdict_8.is_feasible
    assert "TTFT p95 3000 ms > 1000 ms" in verdict_8.reasons[0]
    # Without a latency limit the fastest wins.
    unconstrained = choose(trials, Constraint())
    assert unconstrained.best is not None and unconstrained.best.setting.n_parallel == 8


def test_choose_breaks_near_ties_by_latency() -> None:
    trials = [_trial(4, 500.0, 800.0), _trial(8, 510.0, 1600.0)]  # 2 % apart: noise
    choice = choose(trials, Constraint(tie_tolerance=0.03))
    assert choice.best is not None and choice.best.setting.n_parallel == 4
    assert "lowest TTFT p95" in choice.reason
    strict = choose(trials, Constraint(tie_tolerance=0.0))
    assert strict.best is not None and strict.best.setting.n_parallel == 8


def test_choose_rejects_errors_and_failed_runs() -> None:
    erroring = _trial(8, 900.0, 100.0, failed=5)  # 5 of 25 failed
    broken = Trial(setting=Setting(n_parallel=16, n_ctx=2048), users=8, failure="server exited with status 1")
    good = _trial(2, 200.0, 300.0)
    choice = choose([erroring, broken, good], Constraint(max_error_rate=0.01))
    assert choice.best is not None and choice.best.setting.n_parallel == 2
    reasons = {v.setting.n_parallel: v.reasons for v in choice.verdicts}
    assert "error rate 20.0% > 1.0%" in reasons[8]
    assert reasons[16] == ("did not run: server exited with status 1",)


def test_choose_reports_when_nothing_qualifies() -> None:
    choice = choose([_trial(1, 100.0, 5000.0)], Constraint(max_ttft_p95_ms=100.0))
    assert choice.best is None
    assert "none of the 1 settings" in choice.reason
    assert choose([], Constraint()).reason == "no settings were tried"


def test_judge_needs_ttft_when_a_latency_limit_is_set() -> None:
    trial = Trial(setting=Setting(n_parallel=1, n_ctx=1024), users=1,
                  summary=LoadSummary(users=1, duration_s=5.0, requests_ok=3, completion_tokens=30,
                                      window_tokens=30))
    verdict = judge(trial, Constraint(max_ttft_p95_ms=500.0))
    assert not verdict.is_feasible
    assert "no TTFT measured" in verdict.reasons[0]


def test_trial_needs_a_summary_or_a_reason() -> None:
    with pytest.raises(ValidationError, match="failure reason"):
        Trial(setting=Setting(n_parallel=1, n_ctx=1024), users=1)


def test_render_command_fills_placeholders_and_adds_model(tmp_path: Path) -> None:
    setting = Setting(n_parallel=4, n_ctx=8192)
    argv = render_command(DEFAULT_SERVER_TEMPLATE, setting, host="127.0.0.1", port=8123, model=None)
    assert argv[:3] == [sys.executable, "-m", "server.cli.serve"]
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--n-parallel") + 1] == "4"
    assert argv[argv.index("--n-ctx") + 1] == "8192"
    assert "--model" not in argv
    model = tmp_path / "m.gguf"
    with_model = render_command(DEFAULT_SERVER_TEMPLATE, setting, host="127.0.0.1", port=1, model=model)
    assert with_model[-2:] == ["--model", str(model)]
    # A foreign server names its own flags; {model} placed by the template is not added twice.
    # llama-server's -c is the pool of all slots: {n_ctx_total} = n_ctx x n_parallel
    llama = ("llama-server", "-m", "{model}", "--port", "{port}",
             "-np", "{n_parallel}", "-c", "{n_ctx_total}")
    argv = render_command(llama, setting, host="127.0.0.1", port=9, model=model)
    assert argv == ["llama-server", "-m", str(model), "--port", "9", "-np", "4", "-c", "32768"]
    with pytest.raises(ValueError, match="give --model"):
        render_command(llama, setting, host="127.0.0.1", port=9, model=None)
    with pytest.raises(ValueError, match="bad placeholder"):
        render_command(("srv", "--x", "{gpu}"), setting, host="127.0.0.1", port=9, model=None)


def test_gpu_memory_is_summed_from_a_metrics_page() -> None:
    page = (
        "# HELP edgeserve_gpu_memory_used_bytes GPU memory in use\n"
        "# TYPE edgeserve_gpu_memory_used_bytes gauge\n"
        'edgeserve_gpu_memory_used_bytes{gpu="0",name="Tesla P4"} 1.0e+09\n'
        'edgeserve_gpu_memory_used_bytes{gpu="1",name="Tesla P4"} 5.0e+08\n'
    )
    assert gpu_memory_used_bytes(page) == 1_500_000_000
    assert gpu_memory_used_bytes("# HELP x y\n# TYPE x gauge\nx 1\n") is None


def test_markdown_report_marks_the_choice_and_reasons(tmp_path: Path) -> None:
    from loadtest.report import markdown_table, write_report

    trials = [_trial(1, 150.0, 200.0), _trial(2, 260.0, 400.0), _trial(4, 400.0, 2500.0),
              Trial(setting=Setting(n_parallel=8, n_ctx=2048), users=8,
                    failure="server not ready after 300 s")]
    constraint = Constraint(max_ttft_p95_ms=1000.0)
    choice = choose(trials, constraint)
    table = markdown_table(trials, choice)
    lines = table.splitlines()
    assert len(lines) == 2 + len(trials)
    assert "**chosen**" in lines[3]  # parallel 2
    assert "TTFT p95 2500 ms > 1000 ms" in lines[4]
    assert "did not run: server not ready" in lines[5]

    files = write_report(trials, choice, constraint, workload=Workload(), users=8, duration_s=10,
                         out_dir=tmp_path, stem="sweep", title="test sweep", context="CPU, SmolLM2")
    text = files.markdown.read_text()
    assert text.startswith("# test sweep\n\nCPU, SmolLM2")
    assert "Chosen: --n-parallel 2 --n-ctx 2048" in text
    assert "![throughput and TTFT by n_parallel](sweep.png)" in text
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_result_round_trips_as_json(tmp_path: Path) -> None:
    from loadtest.runner import RunConfig

    broken = Trial(setting=Setting(n_parallel=2, n_ctx=2048), users=2, failure="boom")
    trials = (_trial(1, 150.0, 200.0), broken)
    constraint = Constraint(max_ttft_p95_ms=1000.0)
    result = TuneResult(config=RunConfig(users=2, duration_s=5, out_dir=tmp_path), constraint=constraint,
                        trials=trials, choice=choose(trials, constraint))
    assert TuneResult.model_validate_json(result.model_dump_json()) == result
