"""Schemathesis against the gateway's own OpenAPI: whatever it is sent, it never answers 5xx.

The gateway runs as a process with a fallback chain whose primary is down (it must route around it) and the
embedded engine with a tiny context (96 tokens) as the fallback, so every generation is short. Examples are
few per operation to keep CI fast; the point is the shapes hypothesis invents, not the count.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from loadtest.servers import ServerProcess, free_port, start_gateway, write_chain


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("schema")
    chain = write_chain(tmp / "chain.yaml", [
        {"name": "primary", "kind": "openai", "url": f"http://127.0.0.1:{free_port()}", "n_ctx": 2048},
        {"name": "fallback", "kind": "embedded", "n_ctx": 48, "n_parallel": 2, "queue_size": 8,
         "stall_timeout_s": 20},
    ])
    server = start_gateway(chain, free_port(), tmp / "gateway.log")
    try:
        assert server.wait_http("/ready", 180), "\n".join(server.log_tail())
        yield server
    finally:
        server.stop()


def test_no_server_errors(gateway: ServerProcess) -> None:
    # Schemathesis' pytest plugin does not load under this pytest; its schema and strategies work directly.
    api = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    seen: list[tuple[str, str, int]] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(checks=[not_a_server_error], timeout=300)
            seen.append((case.method, case.path, response.status_code))

        check()
    assert len(seen) >= len(operations)
    assert all(status < 500 for _, _, status in seen)
