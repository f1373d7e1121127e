"""Locust and the tuner against a real `edgeserve serve` on loopback, serving the bundled SmolLM2-135M."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.runner import (
    DEFAULT_SERVER_TEMPLATE,
    free_port,
    render_command,
    run_locust,
    running_server,
    wait_ready,
    warm_up,
)
from loadtest.selection import Setting
from loadtest.tuner import TuneResult
from loadtest.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "loadtest-key"
# One engine thread: llama.cpp's threads wait for each other at every layer, slow on a busy CI machine.
THREADS = "1"
PROMPT_TOKENS = 16
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`edgeserve serve` with 2 slots and an API key, as a real process on a free port."""
    port = free_port()
    serve = render_command(DEFAULT_SERVER_TEMPLATE, Setting(n_parallel=2, n_ctx=1024), host="127.0.0.1",
                           port=port, model=None)
    argv = [*serve, "--api-key", API_KEY, "--threads", THREADS]
    log_path = tmp_path_factory.mktemp("gateway") / "server.log"
    with running_server(argv, log_path) as proc:
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, "/ready", proc, timeout_s=180, log_path=log_path)
        warm_up(base_url, Workload(api_key=API_KEY), count=1)  # as the tuner does before measuring
        yield base_url


def _stats_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as fh:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}


@pytest.mark.slow
def test_locust_measures_streamed_chat_completions(gateway: str, tmp_path: Path) -> None:
    workload = Workload(api_key=API_KEY, prompt_tokens=PROMPT_TOKENS, max_tokens=MAX_TOKENS)
    summary = run_locust(gateway, users=2, duration_s=5, workload=workload, trial_dir=tmp_path)
    assert summary.requests_ok >= 1, summary
    assert summary.requests_failed == 0, summary.errors
    assert summary.users == 2
    # Streaming with ignore_eos: every finished request carried exactly max_tokens and a first-token time.
    assert summary.completion_tokens == MAX_TOKENS * summary.requests_ok
    assert len(summary.ttft_ms) == summary.requests_ok
    assert all(0 < t <= e for t, e in zip(summary.ttft_ms, summary.e2e_ms, strict=True))
    assert summary.tokens_per_s > 0

    rows = _stats_rows(tmp_path / "locust_stats.csv")
    assert int(rows[("POST", "/v1/chat/completions")]["Request Count"]) == summary.requests_ok
    assert int(rows[("POST", "/v1/chat/completions")]["Failure Count"]) == 0
    assert int(rows[("TTFT", "/v1/chat/completions")]["Request Count"]) == summary.requests_ok
    assert ("TOKENS/S", "decode") in rows
    assert json.loads((tmp_path / "summary.json").read_text())["requests_ok"] == summary.requests_ok


@pytest.mark.slow
def test_locust_counts_refused_requests_as_errors(gateway: str, tmp_path: Path) -> None:
    workload = Workload(api_key="wrong", prompt_tokens=PROMPT_TOKENS, max_tokens=MAX_TOKENS)
    summary = run_locust(gateway, users=2, duration_s=2, workload=workload, trial_dir=tmp_path)
    assert summary.requests_ok == 0
    assert summary.requests_failed >= 1
    assert summary.error_rate == 1.0
    assert all(message.startswith("HTTP 401") for message in summary.errors), summary.errors
    rows = _stats_rows(tmp_path / "locust_stats.csv")
    assert int(rows[("POST", "/v1/chat/completions")]["Failure Count"]) == summary.requests_failed


@pytest.mark.slow
def test_batch_test_sweeps_parallel_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    report = tmp_path / "docs" / "cpu.md"
    env = {**os.environ, "EDGESERVE_PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "phase1_foundation" / "batch_test.sh"), "--parallel", "1,2", "--ctx", "1024",
         "--duration", "4", "--prompt-tokens", str(PROMPT_TOKENS),
         "--max-tokens", str(MAX_TOKENS), "--server-args", f"--threads {THREADS}",
         "--out", str(out), "--report", str(report)],
        capture_output=True, text=True, env=env, timeout=400, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = TuneResult.model_validate_json((out / "results.json").read_text())
    assert [t.setting.n_parallel for t in result.trials] == [1, 2]
    assert result.config.users == 2  # the largest --parallel: every setting faces the same load
    for trial in result.trials:
        assert trial.failure is None
        assert trial.summary is not None and trial.summary.requests_ok >= 1
        assert trial.summary.requests_failed == 0
        trial_dir = out / f"p{trial.setting.n_parallel}_c1024"
        assert (trial_dir / "locust_stats.csv").is_file()
        assert "edgeserve_requests_total" in (trial_dir / "metrics.prom").read_text()
        command = (trial_dir / "server_command.txt").read_text()
        assert f"--n-parallel {trial.setting.n_parallel}" in command and f"--threads {THREADS}" in command
    assert result.choice.best is not None
    text = report.read_text()
    assert "| n_parallel | n_ctx |" in text and "**chosen**" in text
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_tuner_records_a_server_that_does_not_start(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.tuner", "run", "--parallel", "1", "--ctx", "512", "--duration", "1",
         "--server-cmd", "{python} -c 'import sys; sys.exit(3)'", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = TuneResult.model_validate_json((out / "results.json").read_text())
    assert result.choice.best is None
    assert result.trials[0].failure is not None
    assert "exited with status 3" in result.trials[0].failure
    assert (out / "report.md").is_file()


def test_tuner_rejects_bad_options_without_a_traceback(tmp_path: Path) -> None:
    for args, message in (
        (["--parallel", "1,two"], "--n-parallel: 'two' is not a whole number"),
        (["--server-cmd", "srv --port {gpu}"], "bad placeholder"),
        (["--model", str(tmp_path / "missing.gguf")], "model file not found"),
    ):
        proc = subprocess.run([sys.executable, "-m", "loadtest.tuner", "run", "--out", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
