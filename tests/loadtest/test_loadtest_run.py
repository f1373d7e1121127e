"""Locust and the tuner against real servers on loopback with the bundled SmolLM2-135M: a headless Locust run
against `edgeserve serve`, and bounded CPU tunes through the launcher that keep their winner as the tuned
profile only when asked (`--save`, `tune apply`) until `tune forget`."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from loadtest.result import TuneResult
from loadtest.runner import run_locust, warm_up
from loadtest.selection import Load
from loadtest.servers import ServerProcess, start_edgeserve
from loadtest.workload import KINDS, Workload

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "loadtest-key"
MAX_TOKENS = 8
SHORT = {"prompt_lengths": "short", "max_prompt_tokens": 64, "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`edgeserve serve` with 2 slots and an API key, as a real process on a free port."""
    log_path = tmp_path_factory.mktemp("gateway") / "server.log"
    server: ServerProcess = start_edgeserve(["--n-parallel", "2", "--n-ctx", "1024", "--api-key", API_KEY],
                                            log_path)
    try:
        server.wait_ready(timeout_s=180)
        warm_up(server.url, Workload(api_key=API_KEY), count=1)  # as the tuner does before measuring
        yield server.url
    finally:
        server.stop()


def _stats_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as fh:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}


@pytest.mark.slow
def test_locust_measures_every_request_kind(gateway: str, tmp_path: Path) -> None:
    workload = Workload(api_key=API_KEY, mix="chat-stream,completion-stream,chat,completion", **SHORT)
    summary = run_locust(gateway, load=Load(users=2), duration_s=6, workload=workload, trial_dir=tmp_path)
    assert summary.requests_ok >= 1, summary
    assert summary.requests_failed == 0, summary.errors
    # ignore_eos: every request generated exactly max_tokens, as the server's `usage` says.
    assert summary.completion_tokens == MAX_TOKENS * summary.requests_ok
    assert summary.prompt_tokens > 0
    rows = _stats_rows(tmp_path / "locust_stats.csv")
    posts = {name: int(row["Request Count"]) for (kind, name), row in rows.items() if kind == "POST"}
    assert set(posts) <= set(KINDS) and sum(posts.values()) == summary.requests_ok
    streamed = sum(n for name, n in posts.items() if KINDS[name][1])
    # TTFT and ITL rows exist for streamed kinds only, one per streamed request.
    assert len(summary.ttft_ms) == streamed
    for row_type in ("TTFT", "ITL", "TOKENS/S"):
        names = {name for (kind, name) in rows if kind == row_type}
        assert all(KINDS[n][1] for n in names), (row_type, names)
        assert sum(int(rows[(row_type, n)]["Request Count"]) for n in names) == streamed
    assert json.loads((tmp_path / "summary.json").read_text())["requests_ok"] == summary.requests_ok


@pytest.mark.slow
def test_locust_counts_refused_requests_as_errors(gateway: str, tmp_path: Path) -> None:
    workload = Workload(api_key="wrong", **SHORT)
    summary = run_locust(gateway, load=Load(users=2), duration_s=2, workload=workload, trial_dir=tmp_path)
    assert summary.requests_ok == 0 and summary.requests_failed >= 1 and summary.error_rate == 1.0
    assert all(message.startswith("HTTP 401") for message in summary.errors), summary.errors
    rows = _stats_rows(tmp_path / "locust_stats.csv")
    assert int(rows[("POST", "chat-stream")]["Failure Count"]) == summary.requests_failed


@pytest.mark.slow
def test_paced_and_step_loads(gateway: str, tmp_path: Path) -> None:
    # 0.5 requests/s from 2 users: each user starts at a random point of its 4 s interval, then sends one
    # request every 4 s; a window of 8 s (less Locust's start) holds both first requests and at most two each.
    paced = run_locust(gateway, load=Load(users=2, rate_rps=0.5), duration_s=8,
                       workload=Workload(api_key=API_KEY, **SHORT), trial_dir=tmp_path / "paced")
    assert 2 <= paced.requests_total + paced.requests_cut <= 4, paced
    # The step shape starts with one user and adds one every 2 s up to -u 2.
    step = run_locust(gateway, load=Load(users=2), duration_s=5,
                      workload=Workload(api_key=API_KEY, shape="step", step_users=1, step_s=2.0, **SHORT),
                      trial_dir=tmp_path / "step")
    assert step.users == 2 and step.requests_failed == 0


def _tune(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGESERVE_PYTHON": sys.executable, "EDGESERVE_TUNED_DIR": str(tmp_path / "tuned")}
    return subprocess.run([str(ROOT / "phase1_foundation" / "batch_test.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False, cwd=ROOT)


def _edgeserve(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """An edgeserve command that reads (or writes) the tuned profiles under `tmp_path` only."""
    env = {**os.environ, "EDGESERVE_TUNED_DIR": str(tmp_path / "tuned")}
    proc = subprocess.run([sys.executable, "-m", "server.cli.app", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _cpu_plan(tmp_path: Path, *flags: str) -> dict[str, Any]:
    plan: dict[str, Any] = json.loads(_edgeserve(["launch", "--card", "cpu", *flags, "--dry-run", "--json"],
                                                 tmp_path).stdout)
    return plan


@pytest.mark.slow
def test_cpu_tune_writes_every_output_and_launch_uses_the_tuned_profile(tmp_path: Path) -> None:
    out = tmp_path / "tune"
    proc = _tune(["--strategy", "search", "--backend", "embedded", "--card", "cpu", "--n-parallel", "1,2",
                  "--n-ctx", "512,1024", "--duration", "5", "--drain", "30",
                  "--prompt-lengths", "short,medium", "--max-prompt-tokens", "120", "--max-tokens", "8",
                  "--max-ttft-p95-ms", "600000", "--json", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    answer = json.loads(proc.stdout)
    result = TuneResult.model_validate_json((out / "results.json").read_text())
    best = result.choice.best
    assert best is not None and answer["best"]["n_parallel"] == best.setting.n_parallel
    assert result.backend == "embedded" and result.card == "cpu" and result.search is not None
    # A bounded search: it started at most the 4 settings of the grid, each once, on real servers.
    assert 2 <= result.search.starts <= 4 and answer["runs"]["search"]["starts"] == result.search.starts
    for trial in result.search.trials:
        assert trial.failure is None and trial.points and trial.memory_kind == "rss"
        assert trial.memory_bytes and trial.predicted_bytes
        run_dir = out / "runs" / trial.setting.label.replace(" ", "_")
        plan = json.loads((run_dir / "plan.json").read_text())
        assert plan["backend"] == "embedded" and plan["n_parallel"] == trial.setting.n_parallel
        assert f"--n-parallel {trial.setting.n_parallel}" in plan["command"] or trial.setting.n_parallel == 1
        assert (run_dir / "closed" / "locust_stats.csv").is_file()
    text = (out / "report.md").read_text()
    assert "## Batch Size Impact (n_parallel" in text and "## Context Length Impact (n_ctx" in text
    for name in answer["files"]["plots"].split(","):
        assert Path(name).read_bytes()[:4] == b"\x89PNG"
    assert "runs" in proc.stderr  # the progress display

    # Without --save nothing is kept: the answer names the winner and the flags that run it as measured.
    assert not (tmp_path / "tuned").exists() and answer["profile"] is None and result.profile_path is None
    assert answer["launch"] == result.launch_command()
    assert "run the winner: edgeserve launch --backend embedded --card cpu" in proc.stderr
    assert "not saved: `edgeserve tune apply" in proc.stderr
    plan = _cpu_plan(tmp_path, *shlex.split(answer["launch"])[2:])
    assert (plan["n_parallel"], plan["n_ctx"]) == (best.setting.n_parallel, best.setting.n_ctx)
    assert "tuned" not in {r["source"] for r in _cpu_plan(tmp_path)["reasons"]}

    # `tune apply` keeps it: the next `edgeserve launch` on this card takes the tuned values, and says where
    # they came from and how to undo it.
    applied = _edgeserve(["tune", "apply", str(out / "results.json")], tmp_path)
    profile = tmp_path / "tuned" / "cpu.yaml"
    assert f"wrote {profile}" in applied.stdout
    plan = _cpu_plan(tmp_path)
    assert (plan["n_parallel"], plan["n_ctx"]) == (best.setting.n_parallel, best.setting.n_ctx)
    reasons = {r["setting"]: r for r in plan["reasons"]}
    assert reasons["n_parallel"]["source"] == "tuned"
    assert f"from edgeserve tune on {date.today().isoformat()} (goodput" in reasons["n_parallel"]["why"]
    assert f"({profile}; undo: edgeserve tune forget --card cpu)" in reasons["n_parallel"]["why"]

    # `tune forget` removes it, and the launcher is back on the packaged profile.
    forgot = _edgeserve(["tune", "forget", "--card", "cpu"], tmp_path)
    assert f"removed {profile}" in forgot.stdout and not profile.exists()
    assert "tuned" not in {r["source"] for r in _cpu_plan(tmp_path)["reasons"]}
    assert "nothing to remove" in _edgeserve(["tune", "forget", "--card", "cpu"], tmp_path).stdout


@pytest.mark.slow
def test_a_saved_tune_is_the_tuned_profile_apply_would_write(tmp_path: Path) -> None:
    out = tmp_path / "tune"
    # As long a run as the search test's: on a busy machine a shorter one may finish no request (no winner).
    proc = _tune(["--backend", "embedded", "--card", "cpu", "--n-parallel", "1", "--n-ctx", "512",
                  "--duration", "5", "--drain", "30", "--prompt-lengths", "short",
                  "--max-prompt-tokens", "64", "--max-tokens", "8", "--max-ttft-p95-ms", "600000",
                  "--save", "--json", "--out", str(out)], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    profile = tmp_path / "tuned" / "cpu.yaml"
    assert json.loads(proc.stdout)["profile"] == str(profile)
    assert "saved as the cpu tuned profile" in proc.stderr
    saved = profile.read_text()
    reasons = {r["setting"]: r for r in _cpu_plan(tmp_path)["reasons"]}
    assert reasons["n_parallel"]["source"] == "tuned" and reasons["n_ctx"]["source"] == "tuned"
    _edgeserve(["tune", "forget", "--card", "cpu"], tmp_path)
    assert not profile.exists()
    _edgeserve(["tune", "apply", str(out / "results.json")], tmp_path)
    assert profile.read_text() == saved


@pytest.mark.slow
def test_tune_records_a_backend_that_does_not_come_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "tune"
    # `edgeserve serve` refuses this engine setting from its environment and exits before it is ready.
    monkeypatch.setenv("EDGESERVE_ENGINE__N_UBATCH", "lots")
    proc = _tune(["--card", "cpu", "--n-parallel", "1", "--n-ctx", "512",
                  "--duration", "1", "--prompt-lengths", "short", "--max-prompt-tokens", "64",
                  "--save", "--out", str(out)], tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = TuneResult.model_validate_json((out / "results.json").read_text())
    assert result.choice.best is None and result.grid is not None and result.profile_path is None
    (trial,) = result.grid.trials
    assert trial.failure is not None and "did not come up" in trial.failure and not trial.points
    assert "engine.n_ubatch" in trial.failure  # the tail of the backend's own log says why
    assert (out / "report.md").is_file() and not (tmp_path / "tuned").exists()


def test_tuner_rejects_bad_options_without_a_traceback(tmp_path: Path) -> None:
    for args, message in (
        (["--n-parallel", "1,two"], "--n-parallel: 'two' is not a whole number"),
        (["--mix", "chat-streaming"], "unknown request kind 'chat-streaming'"),
        (["--model-path", str(tmp_path / "missing.gguf")], "missing.gguf"),
        (["--backend", "vllm"], "unknown backend 'vllm'; supported: auto, sglang, llama-server, embedded"),
    ):
        proc = subprocess.run([sys.executable, "-m", "loadtest.tuner", "run", "--card", "cpu", "--out",
                               str(tmp_path), *args], capture_output=True, text=True, timeout=60, check=False,
                              cwd=ROOT)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_an_outside_load_tool_measures_the_same_server(gateway: str, tmp_path: Path) -> None:
    """servebench (PyPI) drives `edgeserve serve` with the shipped prompts, as bench/crosscheck_servebench.py
    does to check the tuner's figures; every request streams exactly max_tokens tokens by `usage`."""
    binary = Path(sys.executable).with_name("servebench")
    if not binary.is_file():
        pytest.skip("servebench is not installed (phase1_foundation/setup_env.sh test installs it)")
    from loadtest.prompts import data_text

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(line for line in data_text().splitlines() if '"short"' in line) + "\n")
    out = tmp_path / "run.json"
    import httpx

    models = httpx.get(f"{gateway}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    proc = subprocess.run([str(binary), "run", "--url", f"{gateway}/v1", "--model", models["data"][0]["id"],
                           "--concurrency", "2", "--num-requests", "4", "--prompts", str(prompts),
                           "--output-len", str(MAX_TOKENS), "--warmup", "0", "--no-gpu", "--api-key", API_KEY,
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    level = json.loads(out.read_text())["levels"][0]
    assert level["summary"]["completed"] == 4 and level["summary"]["failed"] == 0
    assert [r["output_tokens"] for r in level["requests"]] == [MAX_TOKENS] * 4
