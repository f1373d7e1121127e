"""BackendProcess: one backend child in its own process group, its output streamed line by line.

The child gets a new session (so its process group is its own): stopping it signals the whole group, which
takes SGLang's scheduler processes or uvicorn's workers down with it. A dead leader's leftover group members
are killed too (`reap_group`), so a restart never finds the old port or GPU memory still held.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

LineSink = Callable[[str], None]


def _limit_data(limit_bytes: int) -> Callable[[], None]:
    """A preexec hook capping the child's private writable memory (RLIMIT_DATA: heap and anonymous mmaps)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    return apply


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stat_fields(pid: str) -> list[str] | None:
    """/proc/PID/stat after the command: state, ppid, pgrp, ... (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (Linux /proc): e.g. the backend a supervisor runs."""
    found = []
    for name in os.listdir("/proc"):
        fields = _stat_fields(name) if name.isdigit() else None
        if fields and len(fields) > 1 and fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(name))
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, children's children included (Linux /proc, one pass over it)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        fields = _stat_fields(name) if name.isdigit() else None
        if fields and len(fields) > 1 and fields[0] != "Z":
            parents[int(name)] = int(fields[1])
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found.update(kids)
        frontier += kids
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (Linux /proc)."""
    members: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for name in entries:
        fields = _stat_fields(name) if name.isdigit() else None
        if fields and len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


class BackendProcess:
    """Start a command in a new process group, pump its output to `sink`, keep the last lines, stop the
    group."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        sink: LineSink | None = None,
        tail_lines: int = 400,
        memory_limit_bytes: int | None = None,
    ) -> None:
        if not argv:
            raise ValueError("empty command")
        self.argv = tuple(argv)
        self.env = dict(env or {})
        self._sink = sink
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._tail_lock = threading.Lock()
        self._memory_limit_bytes = memory_limit_bytes
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.started_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def pgid(self) -> int | None:
        """The child's process group id (the child leads its own group)."""
        return self.pid

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("already started")
        preexec = _limit_data(self._memory_limit_bytes) if self._memory_limit_bytes else None
        self._proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.started_at = time.monotonic()
        self._reader = threading.Thread(target=self._pump, name=f"backend-log-{self._proc.pid}", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in iter(self._proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._tail_lock:
                self._tail.append(line)
            if self._sink is not None:
                try:
                    self._sink(line)
                except Exception:  # a broken sink must not stop the pump (the pipe would fill and block)
                    log.exception("backend log sink failed")
        self._proc.stdout.close()

    def tail(self) -> list[str]:
        with self._tail_lock:
            return list(self._tail)

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def drain(self, timeout: float = 5.0) -> None:
        """Wait for the log pump to reach the end of the output (call after the child exited)."""
        if self._reader is not None:
            self._reader.join(timeout)

    def _signal_group(self, sig: int) -> bool:
        if self.pgid is None:
            return False
        try:
            os.killpg(self.pgid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            log.warning("no permission to signal process group %s", self.pgid)
            return False

    def reap_group(self, timeout: float = 5.0) -> None:
        """Kill what is left of the group after the leader died (e.g. SGLang's scheduler processes)."""
        if self.pgid is None or not group_members(self.pgid):
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and group_members(self.pgid):
            time.sleep(0.05)
        if group_members(self.pgid):
            self._signal_group(signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL it after `timeout`; returns the leader's exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            if self.wait(timeout) is None:
                log.warning("backend pid %s ignored SIGTERM for %.0fs: SIGKILL", self.pid, timeout)
                self._signal_group(signal.SIGKILL)
                self.wait(timeout)
        self.reap_group(timeout=min(timeout, 5.0))
        self.drain()
        return self._proc.returncode
