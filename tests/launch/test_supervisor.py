"""The supervisor with real child processes: crash-restart with backoff, clean stop, no orphans, giving up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from server.launch.plan import LaunchPlan
from server.launch.process import descendants, is_alive
from server.launch.supervisor import Supervisor, SupervisorConfig

# A tiny backend: counts its starts in a file, crashes (exit 1) the first `fails` times, then serves /health.
# With a pid file it first starts a grandchild (as SGLang starts its scheduler processes).
CHILD = textwrap.dedent("""
    import pathlib, subprocess, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    counter, fails, port = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    print(f"attempt {n + 1}", flush=True)
    if n < fails:
        print("boom: simulated crash", flush=True)
        sys.exit(1)
    if len(sys.argv) > 4:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pathlib.Path(sys.argv[4]).write_text(str(grandchild.pid))

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    print("listening", flush=True)
    HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")

FAST = SupervisorConfig(
    backoff_initial_s=0.05,
    backoff_factor=2.0,
    backoff_max_s=1.0,
    health_interval_s=0.05,
    health_timeout_s=60,
    stop_timeout_s=5,
    max_restarts=3,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _plan(tmp_path: Path, fails: int, *, grandchild: bool = False) -> LaunchPlan:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = _free_port()
    argv = [sys.executable, str(script), str(tmp_path / "starts"), str(fails), str(port)]
    if grandchild:
        argv.append(str(tmp_path / "grandchild.pid"))
    return LaunchPlan(
        backend="llama-server",
        card="cpu",
        gpus=0,
        model_path="none",
        program=(sys.executable,),
        argv=tuple(argv),
        port=port,
        health_url=f"http://127.0.0.1:{port}/health",
        n_ctx=16,
        n_ctx_total=16,
        n_parallel=1,
        kv_type="f16",
    )


def test_crash_restart_with_backoff(tmp_path: Path) -> None:
    lines: list[str] = []
    status = tmp_path / "status.json"
    plan = _plan(tmp_path, fails=2).model_copy(update={"api_key": "sk-secret-123"})
    sup = Supervisor(plan, FAST, status_path=status, log_prefix="[child]", on_line=lines.append)
    sup.start()
    try:
        assert sup.wait_ready(60), [e.detail for e in sup.events]
        assert sup.restarts == 2
        exits = [e for e in sup.events if e.kind == "exit"]
        assert [e.failure["kind"] for e in exits] == ["crash", "crash"]  # type: ignore[index]
        assert all(e.failure["exit_code"] == 1 for e in exits)  # type: ignore[index]
        assert exits[0].failure["evidence"] == "boom: simulated crash"  # type: ignore[index]
        # exponential backoff: 0.05 s, then 0.1 s
        assert [e.delay_s for e in sup.events if e.kind == "restart"] == [0.05, 0.1]
        assert (tmp_path / "starts").read_text() == "3"
        assert "attempt 1" in lines and "listening" in lines
        data = json.loads(status.read_text())
        assert data["state"] == "ready" and data["restarts"] == 2 and data["pid"] == sup.pid
        assert "sk-secret-123" not in status.read_text()
        pid = sup.pid
    finally:
        sup.stop()
    assert sup.state == "stopped"
    assert pid is not None and not is_alive(pid)
    assert json.loads(status.read_text())["state"] == "stopped"


def test_stop_kills_the_whole_group(tmp_path: Path) -> None:
    sup = Supervisor(_plan(tmp_path, fails=0, grandchild=True), FAST)
    sup.start()
    try:
        assert sup.wait_ready(60)
        child = sup.pid
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        assert child is not None and is_alive(child) and is_alive(grandchild)
    finally:
        sup.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (is_alive(child) or is_alive(grandchild)):
        time.sleep(0.05)
    assert not is_alive(child) and not is_alive(grandchild)


def test_gives_up_after_max_restarts(tmp_path: Path) -> None:
    sup = Supervisor(_plan(tmp_path, fails=100), FAST)
    sup.start()
    assert sup.wait(60)
    assert not sup.wait_ready(0)
    assert sup.state == "failed"
    assert sup.restarts == FAST.max_restarts
    assert sup.events[-1].kind == "give_up"


def test_a_missing_program_fails_at_once(tmp_path: Path) -> None:
    plan = _plan(tmp_path, fails=0).model_copy(update={"argv": ("/nonexistent/llama-server", "-m", "x")})
    sup = Supervisor(plan, FAST)
    sup.start()
    assert sup.wait(30)
    assert sup.state == "failed" and sup.last_failure is not None
    assert sup.last_failure.kind == "load_error"


RUNNER = textwrap.dedent("""
    import json, sys
    from server.launch.plan import LaunchPlan
    from server.launch.supervisor import Supervisor, SupervisorConfig

    plan = LaunchPlan.model_validate_json(open(sys.argv[1]).read())
    config = SupervisorConfig(health_interval_s=0.05, stop_timeout_s=5)
    sup = Supervisor(plan, config, status_path=__import__("pathlib").Path(sys.argv[2]))
    sys.exit(sup.run())
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    plan = _plan(tmp_path, fails=0, grandchild=True)
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    (tmp_path / "runner.py").write_text(RUNNER)
    status = tmp_path / "status.json"
    runner = subprocess.Popen(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "plan.json"), str(status)],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if status.exists() and json.loads(status.read_text() or "{}").get("state") == "ready":
                break
            assert runner.poll() is None, "the supervisor exited early"
            time.sleep(0.1)
        child = json.loads(status.read_text())["pid"]
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        os.kill(runner.pid, sig)
        assert runner.wait(30) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
    assert not is_alive(child) and not is_alive(grandchild)
    assert json.loads(status.read_text())["state"] == "stopped"


def test_descendants_finds_grandchildren_and_not_the_dead() -> None:
    # A shell whose subshell runs sleep: a child and a grandchild, both below it until they are killed.
    tree = subprocess.Popen(["sh", "-c", "(sleep 30; true) & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(descendants(tree.pid)) < 2:
            time.sleep(0.05)
        below = descendants(tree.pid)
        assert len(below) == 2 and tree.pid not in below
        assert all(is_alive(pid) for pid in below)
    finally:
        os.killpg(tree.pid, signal.SIGKILL)
        tree.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and descendants(tree.pid):
        time.sleep(0.05)
    assert descendants(tree.pid) == set()
