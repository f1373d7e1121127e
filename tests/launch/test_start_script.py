"""`./start_sglang.sh` on a CPU machine: the gateway with the embedded engine and the bundled model on a port,
serving completions to the official client; SIGTERM stops it and everything it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.launch.process import descendants, group_members, is_alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_start_script_serves_completions_on_the_cpu(tmp_path: Path, repo) -> None:
    try:
        import server.cli.app  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the edgeserve CLI does not import: {exc}")
    from openai import OpenAI

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESERVE_")}
    env.update(EDGESERVE_PORT=str(port), EDGESERVE_SKIP_SETUP="1", XDG_RUNTIME_DIR=str(tmp_path))
    script = subprocess.Popen(
        [str(repo / "start_sglang.sh"), "--card", "cpu", "--parallel", "2"],
        cwd=repo,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(script, port, 180)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        reply = client.completions.create(
            model="edgeserve", prompt="The capital of France is", max_tokens=5, temperature=0
        )
        assert reply.choices[0].text
        status = json.loads((tmp_path / f"edgeserve-{port}" / "status.json").read_text())
        backend = int(status["pid"])  # the supervised `edgeserve serve`, in its own process group
    finally:
        os.kill(script.pid, signal.SIGTERM)
        try:
            script.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            raise
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (group_members(script.pid) or group_members(backend)):
        time.sleep(0.1)
    assert not group_members(script.pid) and not group_members(backend), "processes left behind"


@pytest.mark.slow
def test_start_script_serves_a_models_file_embedded_and_llama_server(tmp_path: Path, repo) -> None:
    """`./start_sglang.sh --models FILE`: one port, the `model` field picks an embedded model or a supervised
    llama-server; SIGTERM stops the gateway, the engine core and llama-server."""
    from openai import OpenAI

    from server.launch.toolchain import probe_toolchain

    if not probe_toolchain().has_llama_server:
        pytest.skip("llama-server is not installed")
    models = tmp_path / "models.yaml"
    models.write_text("models:\n"
                      "  - {name: small, settings: {n_ctx: 512, n_parallel: 2}}\n"
                      "  - {name: server, backend: llama-server, settings: {n_ctx: 512, n_parallel: 2}}\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESERVE_")}
    # The environment running the tests (a checkout's own .venv, or another named by EDGESERVE_VENV).
    env.update(EDGESERVE_PORT=str(port), EDGESERVE_SKIP_SETUP="1", XDG_RUNTIME_DIR=str(tmp_path),
               EDGESERVE_VENV=sys.prefix)
    script = subprocess.Popen([str(repo / "start_sglang.sh"), "--models", str(models)], cwd=repo, env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(script, port, 120)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        for model in ("server", "small"):
            reply = client.chat.completions.create(model=model, max_tokens=4,
                                                   messages=[{"role": "user", "content": "Hi"}])
            assert reply.model == model and reply.choices[0].message.content
        listed = {m["id"]: m for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]}
        assert listed["server"]["backend"] == "llama-server" and listed["server"]["state"] == "resident"
        assert listed["small"]["state"] == "resident" and listed["small"]["planned_memory_mib"] > 0
        started = descendants(script.pid)  # the engine core and llama-server (in a group of its own)
        assert len(started) >= 2
    finally:
        os.kill(script.pid, signal.SIGTERM)
        try:
            script.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            raise
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(is_alive(pid) for pid in started):
        time.sleep(0.1)
    assert not [pid for pid in started if is_alive(pid)], "processes left behind"


def _wait_ready(script: subprocess.Popen[bytes], port: int, timeout_s: float) -> None:
    """Until /ready answers 200; the script must keep running meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert script.poll() is None, "start_sglang.sh exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
