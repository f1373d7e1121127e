"""Stopping and failing for real: `edgeserve serve` drains on SIGTERM without cutting a stream, and a server
whose model cannot load exits with the reason instead of answering 503 forever."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from loadtest.servers import ServerProcess, start_edgeserve
from quantize.bundled import smollm2_path
from server.cli.serve import FATAL_EXIT
from server.engine.config import EngineConfig
from server.gateway.app import create_app
from server.gateway.settings import GatewaySettings
from server.hardware.available import available_ram

pytestmark = pytest.mark.slow

GRACE_S = 4
# One sequence of SmolLM2's KV cache at its full 8192-token training context: 30 layers x 3 KV heads x 64 x
# (K + V) x f16.
SMOLLM2_SEQ_KV_BYTES = 8192 * 30 * 3 * 64 * 2 * 2


def _stream(url: str, max_tokens: int, out: dict[str, object], first: threading.Event) -> None:
    """Read one streamed completion to its end; record its data lines and how the connection ended."""
    body = {"model": "edgeserve", "prompt": "Tell me a long story about the sea.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            out["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    first.set()
        out["ended"] = "closed"
    except httpx.HTTPError as exc:
        out["ended"] = f"cut: {exc!r}"
    finally:
        out["lines"] = lines
        first.set()


def _refused_soon(url: str) -> bool:
    """True once a new request is refused (no connection, or 503 with Retry-After); False if one is served."""
    for _ in range(100):
        try:
            body = {"model": "edgeserve", "prompt": "hi", "max_tokens": 1}
            reply = httpx.post(url + "/v1/completions", json=body, timeout=10)
        except httpx.HTTPError:
            return True
        if reply.status_code == 503:
            return "retry-after" in reply.headers
        threading.Event().wait(0.1)  # the signal is handled on the server's next tick
    return False


def test_sigterm_ends_every_stream_properly_and_the_server_exits(tmp_path: Path) -> None:
    server = start_edgeserve(["--n-parallel", "2", "--n-ctx", "2048",
                              "--shutdown-grace-s", str(GRACE_S)], tmp_path / "serve.log").wait_ready()
    try:
        long: dict[str, object] = {}
        short: dict[str, object] = {}
        long_started, short_started = threading.Event(), threading.Event()
        readers = [threading.Thread(target=_stream, args=(server.url, 1500, long, long_started)),
                   threading.Thread(target=_stream, args=(server.url, 12, short, short_started))]
        readers[0].start()
        assert long_started.wait(120)
        readers[1].start()
        assert short_started.wait(120)
        os.kill(server.pid, signal.SIGTERM)
        # New requests are no longer taken: the listener closes (a kept-alive connection would get a 503).
        assert _refused_soon(server.url)
        for reader in readers:
            reader.join(120)
        code = server.wait_exit(60)
    finally:
        server.stop()
    assert code is not None, "the server did not exit after its grace period"
    assert code == 0, "a drained stop is a clean exit, not death by SIGTERM (-15)"
    for result in (long, short):
        assert result["status"] == 200
        assert result["ended"] == "closed", result["ended"]  # never a cut connection
        lines = result["lines"]
        assert isinstance(lines, list) and lines[-1] == "[DONE]"
    # The short one finished inside the grace period; the long one was ended with a reason.
    last_short = json.loads(short["lines"][-2])  # type: ignore[index]
    assert last_short["choices"][0]["finish_reason"] == "length"
    last_long = json.loads(long["lines"][-2])  # type: ignore[index]
    assert last_long["error"]["code"] == "server_shutting_down"
    assert len(long["lines"]) > 3  # type: ignore[arg-type]


def _fails_to_start(args: list[str], log: Path) -> tuple[int | None, str]:
    server: ServerProcess = start_edgeserve(args, log)
    code = server.wait_exit(180)
    server.stop()
    return code, "\n".join(server.log_tail(80))


def test_a_damaged_model_makes_serve_exit_with_the_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_path().read_bytes()[: 4 * 1024 * 1024])  # a truncated download
    code, log = _fails_to_start(["--model-path", str(broken)], tmp_path / "serve.log")
    assert code == FATAL_EXIT, log
    assert "failed to load" in log


def test_settings_that_cannot_fit_are_refused_with_what_would(tmp_path: Path) -> None:
    ram = available_ram()
    if ram is None:
        pytest.skip("no /proc/meminfo: free memory cannot be read here")
    n_parallel = math.ceil(2 * ram.free_bytes / SMOLLM2_SEQ_KV_BYTES)
    if n_parallel > 256:
        pytest.skip(f"{ram.free_bytes} bytes free: no SmolLM2 setting of 256 sequences fails to fit")
    code, log = _fails_to_start(["--n-parallel", str(n_parallel), "--n-ctx", "8192"],
                                tmp_path / "serve.log")
    assert code == FATAL_EXIT, log
    assert "does not fit" in log and f"{n_parallel} x 8,192 tokens" in log
    assert "--n-ctx" in log and "fits (--force starts anyway)" in log


def test_a_model_that_failed_to_load_is_reported_as_dead(tmp_path: Path) -> None:
    settings = GatewaySettings(engine=EngineConfig(model_path=str(tmp_path / "missing.gguf")),
                               enable_gpu_metrics=False)
    with TestClient(create_app(settings)) as client:
        state = client.app.state.gateway  # type: ignore[attr-defined]
        while state.loader is None or not state.loader.done():
            threading.Event().wait(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        ready = client.get("/ready")
        assert ready.status_code == 503 and "retry-after" not in ready.headers
        reply = client.post("/v1/completions", json={"model": "edgeserve", "prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 503 and "retry-after" not in reply.headers
        assert reply.json()["error"]["code"] == "model_load_failed"
        assert client.get("/v1/models").status_code == 503
