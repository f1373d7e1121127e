"""Several machines, one model, really started on one machine: llama.cpp's rpc-server on 127.0.0.2 and
127.0.0.3 (loopback addresses of their own) and llama-server on 127.0.0.1 using them through --rpc, each run
with exactly the command `edgeserve launch --cluster` prints for its node."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtest.servers import free_port
from quantize.bundled import smollm2_path
from quantize.model.units import GIB
from server.hardware.target import CpuTarget
from server.launch.cluster import ClusterSpec, cluster_commands
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.toolchain import Toolchain

pytestmark = pytest.mark.slow
# setup_env.sh links the llama.cpp programs it builds here (test mode builds them on the CPU).
VENV_BIN = str(Path(sys.prefix) / "bin")
SEARCH_PATH = os.pathsep.join([VENV_BIN, os.environ.get("PATH", "")])


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def test_llama_server_serves_over_rpc_servers_as_the_cluster_plan_says(tmp_path: Path) -> None:
    llama_server = shutil.which("llama-server", path=SEARCH_PATH)
    rpc_server = shutil.which("ggml-rpc-server", path=SEARCH_PATH)
    if llama_server is None or rpc_server is None:
        pytest.skip("llama-server / rpc-server not built (phase1_foundation/setup_env.sh test builds them)")
    spec = ClusterSpec(backend="llama-server", card="cpu", gpus_per_node=0, model_path=str(smollm2_path()),
                       rpc_port=free_port(), nodes=({"host": "127.0.0.1"}, {"host": "127.0.0.2"},
                                                    {"host": "127.0.0.3"}))
    toolchain = Toolchain(python=sys.executable, llama_server=llama_server, cpu_threads=1)
    request = LaunchRequest(port=free_port(), n_parallel=1, n_ctx=512)
    commands = cluster_commands(
        spec, request, lambda r: make_plan(r, toolchain=toolchain, target=CpuTarget(ram_bytes=16 * GIB)))
    head, *workers = commands
    assert [w.argv[0] for w in workers] == ["ggml-rpc-server", "ggml-rpc-server"]
    assert "--rpc" in head.argv
    # Verbosity 4 lets llama-server print where the loader put each buffer (the default hides it).
    env = {**os.environ, "PATH": SEARCH_PATH, "LLAMA_ARG_LOG_VERBOSITY": "4"}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for cmd in commands[1:] + commands[:1]:  # the workers first: llama-server connects at load
            log = (tmp_path / f"node{cmd.rank}.log").open("wb")
            logs.append(log)
            procs.append(subprocess.Popen(list(cmd.argv), env={**env, **cmd.env}, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            if cmd.rank:
                deadline = time.monotonic() + 60
                while not _listening(cmd.host, spec.rpc_port) and time.monotonic() < deadline:
                    assert procs[-1].poll() is None, (tmp_path / f"node{cmd.rank}.log").read_text()
                    time.sleep(0.2)
        url = f"http://127.0.0.1:{request.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert procs[-1].poll() is None, (tmp_path / "node0.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        reply = httpx.post(url + "/v1/completions", json={"prompt": "The capital of France is",
                                                          "max_tokens": 6, "temperature": 0}, timeout=300)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 6
    finally:
        # The head first: llama-server asks its rpc-servers for memory figures as it exits.
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
    head_log = (tmp_path / "node0.log").read_text(errors="replace")
    # llama.cpp names each remote device after its endpoint; the model's layers went to them.
    for worker in workers:
        assert f"[{worker.host}:{spec.rpc_port}] model buffer size" in head_log, head_log[-3000:]
