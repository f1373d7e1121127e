"""`edgeserve launch`'s stack for real on the CPU: a backend under its supervisor with edgeserve's gateway in
front; clients go through the gateway; a stop drains the gateway (streams end with [DONE]) before anything is
killed, and leaves no process behind; a SIGTERM to `edgeserve launch` ends it with status 0."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from loadtest.servers import free_port, spawn
from quantize.model.units import GIB
from server.hardware.target import CpuTarget
from server.launch.front import gateway_plan, stop_timeout_s
from server.launch.planner import make_plan
from server.launch.process import group_members
from server.launch.request import LaunchRequest
from server.launch.stack import Stack
from server.launch.supervisor import SupervisorConfig
from server.launch.toolchain import Toolchain

pytestmark = pytest.mark.slow
EDGESERVE = (sys.executable, "-m", "server.cli.app")


def test_the_gateway_in_front_serves_and_a_stop_drains_it_first() -> None:
    toolchain = Toolchain(python=sys.executable, edgeserve=EDGESERVE, cpu_threads=1)
    request = LaunchRequest(backend="embedded", card="cpu", n_parallel=2, n_ctx=1024,
                            port=free_port(), shutdown_grace_s=2)
    backend = make_plan(request, toolchain=toolchain, target=CpuTarget(ram_bytes=16 * GIB))
    front = gateway_plan(backend, program=EDGESERVE, host="127.0.0.1", port=free_port(), api_key=None)
    assert front.backend == "gateway" and f"http://127.0.0.1:{backend.port}" in front.argv
    assert stop_timeout_s(front) > front.shutdown_grace_s  # a stop waits for the drain
    stack = Stack(backend, front, SupervisorConfig(health_interval_s=0.2, backoff_initial_s=0.1))
    assert stack.start()
    assert stack.front is not None and stack.front.wait_ready(180)
    url = f"http://127.0.0.1:{front.port}"
    pids = [s.pid for s in stack.supervisors]
    lines: list[str] = []
    try:
        first = {"model": "edgeserve", "prompt": "The capital of France is", "max_tokens": 4,
                 "temperature": 0}
        reply = httpx.post(url + "/v1/completions", json=first, timeout=120)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
        body = {"model": "edgeserve", "prompt": "Count to a thousand:", "max_tokens": 900, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            stopper = None
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                if len(lines) == 3 and stopper is None:
                    stopper = threading.Thread(target=stack.stop)
                    stopper.start()
        assert stopper is not None
        stopper.join(60)
    finally:
        stack.stop()
    assert lines[-1] == "[DONE]"
    assert json.loads(lines[-2])["error"]["code"] == "server_shutting_down"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(pid and group_members(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(pid and group_members(pid) for pid in pids), "processes left behind"
    assert {s.state for s in stack.supervisors} == {"stopped"}


def test_launch_exits_0_after_a_sigterm_drain(tmp_path: Path) -> None:
    """`edgeserve launch` as a service manager runs it: SIGTERM stops it cleanly, so its status is 0 (a unit
    or a wrapper checking `$? == 0` sees no failure), and the backend it ran drained and exited 0 too."""
    port = free_port()
    server = spawn([*EDGESERVE, "launch", "--backend", "embedded", "--card", "cpu", "--n-parallel", "1",
                    "--n-ctx", "512", "--port", str(port), "--shutdown-grace-s", "2", "--no-ladder"],
                   tmp_path / "launch.log", port, "edgeserve launch").wait_ready(timeout_s=180)
    try:
        reply = httpx.post(server.url + "/v1/completions", timeout=120,
                           json={"model": "edgeserve", "prompt": "Hello", "max_tokens": 2})
        assert reply.status_code == 200
        os.kill(server.pid, signal.SIGTERM)
        code = server.wait_exit(60)
    finally:
        server.stop()
    log = "\n".join(server.log_tail(60))
    assert code == 0, log
    assert "backend stopped (exit 0)" in log
