"""The engine core in a process of its own: killed under load, it is started again by the gateway, which
itself never stops serving; the streams in flight end with an error event and [DONE], not a cut connection."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from loadtest.servers import ServerProcess, start_edgeserve


def core_pid(gateway_pid: int) -> int:
    """The gateway's child that runs the engine core (started from whichever of its threads)."""
    children = [c for task in Path(f"/proc/{gateway_pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    cores = [int(c) for c in children
             if b"server.engine.core_proc" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(cores) == 1, f"expected one engine core among {children}"
    return cores[0]


def stream_events(url: str, model: str, max_tokens: int, started: threading.Event) -> list[str]:
    body = {"model": model, "prompt": "Count slowly:", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                lines.append(line[5:].strip())
                started.set()
    return lines


@pytest.mark.slow
def test_a_killed_core_is_started_again_and_the_gateway_keeps_serving(tmp_path: Path) -> None:
    server: ServerProcess = start_edgeserve(["--n-parallel", "4", "--n-ctx", "512"], tmp_path / "serve.log")
    try:
        server.wait_ready()
        gateway_pid = server.proc.pid
        model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        first_core = core_pid(gateway_pid)
        results: list[list[str]] = []
        started = [threading.Event() for _ in range(3)]
        threads = [threading.Thread(target=lambda i=i: results.append(
            stream_events(server.url, model, 400, started[i]))) for i in range(3)]
        for t in threads:
            t.start()
        for ev in started:
            assert ev.wait(60), "a stream never started"
        os.kill(first_core, signal.SIGKILL)
        for t in threads:
            t.join(120)
        # Every stream ended properly: an OpenAI error event, then [DONE]; none was cut off.
        assert len(results) == 3
        for lines in results:
            assert lines[-1] == "[DONE]"
            error = json.loads(lines[-2])
            assert error["error"]["code"] == "engine_error", error
            assert "core died" in error["error"]["message"]
        # The gateway process never went away: it reports not ready, then ready again with a new core.
        deadline = time.monotonic() + 120
        while httpx.get(server.url + "/ready", timeout=10).status_code != 200:
            assert server.proc.poll() is None
            assert time.monotonic() < deadline, "the core was not started again"
            time.sleep(0.2)
        assert server.proc.pid == gateway_pid and server.proc.poll() is None
        assert core_pid(gateway_pid) != first_core
        body = {"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
