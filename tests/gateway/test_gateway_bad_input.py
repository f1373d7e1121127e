"""Bad input never reaches a 500 or drops the connection: text UTF-8 cannot encode, broken JSON, wrong types,
content a text model cannot take, deep nesting. Each request goes over one keep-alive connection, and the
same connection must then still serve a good request."""

from __future__ import annotations

import json

import httpx
import pytest

from loadtest.servers import ServerProcess

pytestmark = pytest.mark.slow

GOOD = {"model": "edgeserve", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _nested(depth: int) -> str:
    return '{"model": "edgeserve", "messages": [{"role": "user", "content": "x"}], "metadata": ' + \
        "[" * depth + "]" * depth + "}"


CASES = [
    # (path, raw body, expected param or None, a piece of the message)
    ("/v1/chat/completions", '{"model": "edgeserve", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content", "lone surrogate"),
    ("/v1/completions", '{"model": "edgeserve", "prompt": "a\\udfffb"}', "prompt", "lone surrogate"),
    ("/v1/embeddings", '{"model": "edgeserve", "input": ["ok", "\\ud800"]}', "input", "lone surrogate"),
    ("/v1/chat/completions", '{"model": "edgeserve", "messages": [{"role": "user", "content": "x"}], '
     '"logit_bias": {"\\ud800": 1}}', "logit_bias", "lone surrogate"),
    ("/v1/chat/completions", '{"model": "edgeserve", "messages": [}', None, "at character 36"),
    ("/v1/chat/completions", '{"model": "edgeserve", "messages": [{"role": "user", "content": [{"type": '
     '"image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}', "messages.0.content",
     "image input is not supported by this model"),
    ("/v1/chat/completions", json.dumps({**GOOD, "max_tokens": "8"}), "max_tokens", "valid integer"),
    ("/v1/chat/completions", json.dumps({**GOOD, "max_tokens": True}), "max_tokens", "valid integer"),
    ("/v1/chat/completions", json.dumps({**GOOD, "stream": "yes"}), "stream", "valid boolean"),
    ("/v1/chat/completions", json.dumps({**GOOD, "temperature": 1e400}), "temperature", ""),
    ("/v1/chat/completions", json.dumps({**GOOD, "seed": 2**80}), "seed", ""),
    ("/v1/chat/completions", json.dumps({**GOOD, "top_k": -5}), "top_k", ""),
    ("/v1/chat/completions", json.dumps({**GOOD, "mystery": 1}), "mystery", "unknown field"),
    ("/v1/chat/completions", "[1, 2]", None, "JSON object"),
    # SGLang's extensions are taken at the values sglang-router sends (tests/launch/test_router_cluster.py),
    # refused at others.
    ("/v1/completions", '{"model": "edgeserve", "prompt": "x", "no_stop_trim": true}', "no_stop_trim",
     "stop sequences are trimmed"),
    ("/v1/chat/completions", json.dumps({**GOOD, "skip_special_tokens": False}), "skip_special_tokens", ""),
    ("/v1/chat/completions", _nested(5000), None, ""),
]


@pytest.mark.parametrize(("path", "raw", "param", "words"), CASES)
def test_bad_input_is_a_400_and_the_connection_lives_on(shared_embedded_server: ServerProcess, path: str,
                                                        raw: str, param: str | None, words: str) -> None:
    with httpx.Client(base_url=shared_embedded_server.url, timeout=120) as client:
        bad = client.post(path, content=raw.encode("utf-8", "surrogatepass"),
                          headers={"Content-Type": "application/json"})
        assert 400 <= bad.status_code < 500, bad.text
        error = bad.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if param is not None or words in ("at character 36", "JSON object"):
            assert error["param"] == param, error
        assert words in error["message"], error
        good = client.post("/v1/chat/completions", json=GOOD)  # the same keep-alive connection
        assert good.status_code == 200, good.text
