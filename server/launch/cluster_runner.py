"""`edgeserve cluster up`: start a planned cluster (server.launch.replicas) and keep it until it is stopped.

Boxes on this machine start as child processes; a remote box starts over ssh only when asked (`--ssh`), else
the run refuses before anything starts and names the command to run there. Every box's gateway must answer
/ready before the router starts, so the router's first health checks find the workers up. Stopping (Ctrl-C,
SIGTERM) takes the router down first, then the boxes, each by its own process group.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from server.launch.cluster import NodeCommand
from server.launch.process import BackendProcess
from server.launch.replicas import BoxPlan, ClusterPlan, ssh_argv

log = logging.getLogger(__name__)


class ClusterStartError(RuntimeError):
    """A box or the router did not come up; the message says which and ends with its log's last lines."""


@dataclass
class Started:
    """One process this run started, and where its output goes."""

    name: str
    process: BackendProcess
    log_path: Path
    log_file: IO[str]


def remote_boxes_refused(plan: ClusterPlan, use_ssh: bool) -> list[BoxPlan]:
    """Remote boxes this run may not start (all of them without --ssh)."""
    return [] if use_ssh else [b for b in plan.boxes if not b.is_local]


def wait_ready(url: str, is_alive: Callable[[], bool], timeout_s: float, path: str = "/ready") -> bool:
    """Poll `url + path` until 200 (True), the process dies or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive():
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2.0).status_code == 200:
                return True
        time.sleep(0.25)
    return False


def _alive(process: BackendProcess) -> Callable[[], bool]:
    return lambda: process.poll() is None


class ClusterRunner:
    """Starts the boxes this machine may start, then the router; `stop()` ends all of them."""

    def __init__(self, plan: ClusterPlan, *, log_dir: Path, use_ssh: bool = False,
                 ready_timeout_s: float = 600.0) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.use_ssh = use_ssh
        self.ready_timeout_s = ready_timeout_s
        self.started: list[Started] = []
        self.router: Started | None = None

    def _spawn(self, name: str, argv: tuple[str, ...], env: dict[str, str] | None = None) -> Started:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{name}.log"
        fh = path.open("a", buffering=1)

        def sink(line: str) -> None:
            fh.write(line + "\n")

        process = BackendProcess(argv, env, sink=sink)
        process.start()
        started = Started(name=name, process=process, log_path=path, log_file=fh)
        self.started.append(started)
        log.info("started %s (pid %s): %s", name, process.pid, " ".join(argv))
        return started

    def _box_argv(self, box: BoxPlan, command: NodeCommand) -> tuple[str, ...]:
        return command.argv if box.is_local else ssh_argv(box.ssh, command)

    def _failure(self, what: str, started: Started) -> ClusterStartError:
        tail = "\n".join(started.process.tail()[-30:])
        return ClusterStartError(f"{what} (log: {started.log_path}):\n{tail}")

    def start(self) -> None:
        """Every box, each waited for, then the router. Raises ClusterStartError (after stopping all)."""
        refused = remote_boxes_refused(self.plan, self.use_ssh)
        if refused:
            hosts = ", ".join(b.host for b in refused)
            raise ClusterStartError(f"boxes {hosts} are not this machine: start each with the commands "
                                    "`edgeserve cluster plan` prints, or pass --ssh to start them over ssh")
        try:
            for rank, box in enumerate(self.plan.boxes):
                last: Started | None = None
                for i, command in enumerate(box.commands):
                    last = self._spawn(f"box{rank}-{i}", self._box_argv(box, command), dict(command.env))
                assert last is not None
                if not wait_ready(box.worker_url, _alive(last.process), self.ready_timeout_s):
                    raise self._failure(f"box {box.host}: {box.worker_url}/ready did not answer 200", last)
                log.info("box %s ready at %s", box.host, box.worker_url)
            self.router = self._spawn("router", self.plan.router.argv)
            if not wait_ready(self.plan.router.url, _alive(self.router.process), self.ready_timeout_s,
                              path="/readiness"):
                raise self._failure(f"router: {self.plan.router.url}/readiness did not answer 200",
                                    self.router)
        except BaseException:
            self.stop()
            raise
        log.info("router ready at %s (metrics %s)", self.plan.router.url, self.plan.router.metrics_url)

    def wait(self, poll_s: float = 1.0) -> int:
        """Block while the router runs; its exit code when it stops on its own."""
        assert self.router is not None, "start() first"
        while True:
            code = self.router.process.wait(poll_s)
            if code is not None:
                log.error("the router exited with code %s", code)
                return code

    def stop(self) -> None:
        """Router first (no new requests to boxes going away), then the boxes in reverse order."""
        for started in reversed(self.started):
            code = started.process.stop()
            with contextlib.suppress(OSError):
                started.log_file.close()
            log.info("stopped %s (exit %s)", started.name, code)
        self.started.clear()
