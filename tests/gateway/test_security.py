"""API key on /v1/* (401 in the OpenAI shape), open probes, /metrics access by setting, body size limit (413).

The app runs in-process over a real upstream backend that points at a closed port: nothing here needs a model,
and every answer that is not about security is the honest 503 of a gateway whose backend is down.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from loadtest.servers import free_port
from server.gateway.app import create_app
from server.gateway.backends.openai_upstream import OpenAIUpstreamBackend
from server.gateway.settings import GatewaySettings

KEY = "sk-edgeserve-test-key"
LIMIT = 4096
CHAT = {"model": "edgeserve", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def client_for(**settings: object) -> TestClient:
    dead = f"http://127.0.0.1:{free_port()}"
    config = GatewaySettings(backend="openai", upstream_url=dead, api_key=KEY, max_body_bytes=LIMIT,
                             enable_gpu_metrics=False, upstream_health_interval_s=60, **settings)
    return TestClient(create_app(config, backend=OpenAIUpstreamBackend(dead, health_interval_s=60)))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with client_for() as c:
        yield c


def assert_openai_error(reply: object, status: int, code: str) -> dict[str, object]:
    assert reply.status_code == status, reply.text  # type: ignore[attr-defined]
    body = reply.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
])
def test_v1_without_the_right_key_is_401(client: TestClient, headers: dict[str, str]) -> None:
    for reply in (client.post("/v1/chat/completions", json=CHAT, headers=headers),
                  client.post("/v1/completions", json={"model": "edgeserve", "prompt": "x"}, headers=headers),
                  client.get("/v1/models", headers=headers)):
        error = assert_openai_error(reply, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
        assert reply.headers["www-authenticate"] == "Bearer"


def test_the_right_key_passes(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/v1/models", headers=auth).status_code == 200
    # Past the key check the request meets the dead backend: 503 with Retry-After, not 401.
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert_openai_error(reply, 503, "model_not_ready")
    assert int(reply.headers["retry-after"]) >= 1


def test_a_backend_503_says_when_to_retry_as_configured() -> None:
    with client_for(retry_after_s=7) as c:
        reply = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"})
    assert_openai_error(reply, 503, "model_not_ready")
    assert reply.headers["retry-after"] == "7"


def test_probes_are_open(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503  # not ready, but not locked either


def test_metrics_open_by_default(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 200


def test_metrics_behind_the_key_when_configured() -> None:
    with client_for(metrics_require_api_key=True) as c:
        assert_openai_error(c.get("/metrics"), 401, "invalid_api_key")
        assert c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_declared_body_over_the_limit_is_413(client: TestClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 * LIMIT)}]}
    reply = client.post("/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {KEY}"})
    error = assert_openai_error(reply, 413, "request_too_large")
    assert error["type"] == "invalid_request_error"


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "edgeserve", "prompt": "'
        for _ in range(LIMIT // 512 + 2):
            yield b"y" * 512
        yield b'"}'

    reply = client.post("/v1/completions", content=chunks(),
                        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in reply.request.headers}
    assert_openai_error(reply, 413, "request_too_large")


def test_body_under_the_limit_reaches_validation(client: TestClient) -> None:
    reply = client.post("/v1/chat/completions", json={"model": "edgeserve", "messages": []},
                        headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
