"""The gateway in front of a real llama-server on loopback: chunks that need nothing rewritten reach the
client as llama-server wrote them, and the stream still reads as one (one id, one fingerprint); where the
names differ the gateway writes the chunks itself."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.servers import ServerProcess, free_port, spawn, start_edgeserve
from quantize.bundled import smollm2_path

pytestmark = pytest.mark.slow
LLAMA_SERVER = Path(sys.executable).parent / "llama-server"
ALIAS = "smollm2-upstream"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not LLAMA_SERVER.exists():
        pytest.skip("no llama-server beside this Python (phase1_foundation/setup_env.sh test builds it)")
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "llama-server.log"
    cmd = [str(LLAMA_SERVER), "-m", str(smollm2_path()), "--host", "127.0.0.1", "--port", str(port),
           "-np", "2", "-c", "2048", "--alias", ALIAS]
    server = spawn(cmd, log, port, "llama-server")
    server.wait_ready("/health")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateways(llama_server: ServerProcess,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """The gateway as `launch` runs it (its model is the upstream's), and one that serves another name."""
    logs = tmp_path_factory.mktemp("gateways")
    same = start_edgeserve(["--backend", "openai", "--upstream-url", llama_server.url, "--n-parallel", "2"],
                           logs / "same.log").wait_ready()
    renamed = start_edgeserve(["--backend", "openai", "--upstream-url", llama_server.url, "--n-parallel", "2",
                               "--model-name", "renamed"], logs / "renamed.log").wait_ready()
    yield same, renamed
    same.stop()
    renamed.stop()


def stream(url: str, route: str, body: dict[str, object]) -> list[dict[str, object]]:
    chunks = []
    with httpx.stream("POST", url + route, json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(json.loads(line[5:]))
    return chunks


def text_of(chunks: list[dict[str, object]]) -> str:
    out = []
    for c in chunks:
        for choice in c.get("choices") or ():  # type: ignore[attr-defined]
            out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name three colors."}],
                              "max_tokens": 12, "temperature": 0}),
])
def test_content_chunks_pass_through_as_one_stream(llama_server: ServerProcess, gateways, route: str,
                                                   body: dict[str, object]) -> None:
    same, _ = gateways
    direct = stream(llama_server.url, route, {**body, "model": ALIAS})
    proxied = stream(same.url, route, {**body, "model": ALIAS,
                                       "stream_options": {"include_usage": True}})
    assert text_of(proxied) == text_of(direct)
    assert len({c["id"] for c in proxied}) == 1  # the gateway's own chunks took the upstream's id
    fingerprints = {c["system_fingerprint"] for c in proxied}
    assert fingerprints == {direct[0]["system_fingerprint"]}  # llama-server's, not the gateway's
    content = [c for c in proxied if text_of([c])]
    assert content, "no content chunk"
    # Passed through: llama-server's chunks as it wrote them, keys in its order and without the "usage"
    # key that every chunk the gateway builds carries.
    direct_keys = [list(c) for c in direct if text_of([c])]
    assert all(list(c) == direct_keys[0] for c in content)
    assert all("usage" not in c for c in content)
    assert proxied[-1]["usage"]["completion_tokens"] == 12  # the gateway's usage chunk ends the stream


def test_another_served_name_gets_chunks_written_by_the_gateway(llama_server: ServerProcess,
                                                                gateways) -> None:
    _, renamed = gateways
    body = {"model": "renamed", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    chunks = stream(renamed.url, "/v1/completions", body)
    direct = stream(llama_server.url, "/v1/completions", {**body, "model": ALIAS})
    assert text_of(chunks) == text_of(direct)
    assert {c["model"] for c in chunks} == {"renamed"}
    assert all("usage" in c for c in chunks)
