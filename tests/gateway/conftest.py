"""Fixtures of the gateway tests: real servers on 127.0.0.1 (started by loadtest/servers.py) and the
conditions some scenarios need.

One embedded server (`shared_embedded_server`) is shared by every test of the session: the model loads once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from loadtest.servers import ServerProcess, start_edgeserve

# Room for 8 concurrent sequences of a few hundred tokens, small enough to load fast on 2 cores.
EMBEDDED_PARALLEL = 8
EMBEDDED_CTX = 1024  # tokens per sequence: a pool of 8192 cells


@pytest.fixture(scope="session")
def shared_embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`edgeserve serve` over the bundled SmolLM2, 8 sequences of 1024 tokens."""
    # The engine's own thread count: its waiting threads sleep (server/__init__.py), so the test process and
    # the other servers beside it slow it down without stalling it.
    args = ["--n-parallel", str(EMBEDDED_PARALLEL), "--n-ctx", str(EMBEDDED_CTX)]
    server = start_edgeserve(args, tmp_path_factory.mktemp("embedded") / "serve.log").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedded_client(shared_embedded_server: ServerProcess) -> openai.OpenAI:
    """The official openai client on the shared embedded server."""
    return openai.OpenAI(base_url=shared_embedded_server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=600)


@pytest.fixture(scope="module")
def edgeserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """edgeserve(*args, ready_path="/ready", env=None): `edgeserve serve ARGS` on a free port, waited for;
    whatever is still running is stopped at the end of the module."""
    started: list[ServerProcess] = []
    logs: Path = tmp_path_factory.mktemp("edgeserve")

    def start(*args: str, ready_path: str = "/ready", env: dict[str, str] | None = None) -> ServerProcess:
        server = start_edgeserve(args, logs / f"serve-{len(started)}.log", env=env)
        started.append(server)
        return server.wait_ready(ready_path)

    yield start
    for server in started:
        server.stop()


def _overcommit_refuses_huge_allocations() -> bool:
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() != "1"
    except OSError:
        return False


@pytest.fixture
def impossible_allocation_fails() -> None:
    """Skips unless a 2 TB KV cache is refused at once: under `vm.overcommit_memory=1` it would be granted and
    then touched until the kernel's OOM killer picks a victim, maybe not ours."""
    if not _overcommit_refuses_huge_allocations():
        pytest.skip("vm.overcommit_memory=1: a 2 TB allocation would be granted and end in the OOM killer")
