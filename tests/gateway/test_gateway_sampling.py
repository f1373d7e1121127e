"""Sampling through the gateway: the defaults a request gets, logit_bias, SSE lines every client can split."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from loadtest.servers import ServerProcess
from server.engine.types import SamplingParams
from server.gateway.backends.features import ALL_FEATURES
from server.gateway.jobs import chat_job
from server.gateway.sampling_defaults import SAMPLING_DEFAULTS
from server.gateway.schemas import ChatCompletionRequest
from server.gateway.settings import GatewaySettings

# The model continues this list greedily ("seven", U+2028, "eight", ...): tokens that decode to a character
# Python's str.splitlines() breaks lines at.
LINE_SEPARATED = "one\u2028two\u2028three\u2028four\u2028five\u2028six\u2028"


class _Backend:
    """Just enough of a backend for building jobs: no token counting, a context of 4096."""

    name = "test"
    n_ctx = 4096
    features = ALL_FEATURES

    def count_prompt_tokens(self, job: object) -> None:
        return None


def _params(body: dict[str, object], defaults: str) -> SamplingParams:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                **body})
    return chat_job(req, _Backend(), "m", SAMPLING_DEFAULTS[defaults]).params  # type: ignore[arg-type]


def test_omitted_fields_get_llama_server_defaults() -> None:
    p = _params({}, "llama-server")
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.8, 0.95, 40, 0.05)


def test_openai_defaults_sample_the_whole_vocabulary() -> None:
    p = _params({}, "openai")
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)


def test_fields_given_win_over_defaults() -> None:
    p = _params({"temperature": 0.2, "top_k": 0, "min_p": 0.0, "top_p": 0.5}, "llama-server")
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.2, 0.5, 0, 0.0)


def test_unknown_defaults_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="llama-server, openai"):
        GatewaySettings(sampling_defaults="vllm")


def test_logit_bias_maps_minus_100_to_a_ban() -> None:
    p = _params({"logit_bias": {"42": -100, "7": 3.5}}, "llama-server")
    assert dict(p.logit_bias) == {42: float("-inf"), 7: 3.5}


@pytest.fixture(scope="module")
def server(shared_embedded_server: ServerProcess) -> ServerProcess:
    return shared_embedded_server


@pytest.mark.slow
def test_models_say_which_defaults_apply(server: ServerProcess) -> None:
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["sampling_defaults"] == {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}


@pytest.mark.slow
def test_readme_request_without_max_tokens_ends_on_its_own(server: ServerProcess) -> None:
    # The README's example: no max_tokens, no temperature. With llama-server's defaults the answer ends with
    # the model's end-of-turn, not at the context limit (a seed keeps the draw the same on every run).
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, seed=7,
        messages=[{"role": "user", "content": "Name three colors."}])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens < 200


@pytest.mark.slow
def test_sse_escapes_unicode_line_separators(server: ServerProcess) -> None:
    body = {"model": "edgeserve", "prompt": LINE_SEPARATED, "max_tokens": 12, "temperature": 0,
            "stream": True}
    texts = []
    with httpx.Client(timeout=120) as client, client.stream("POST", server.url + "/v1/completions",
                                                             json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():  # splits like str.splitlines(): at U+2028 too
            if not line.startswith("data: ") or line == "data: [DONE]":
                assert line == "" or line == "data: [DONE]", repr(line)
                continue
            texts.append(json.loads(line[6:])["choices"][0]["text"])
    assert "\u2028" in "".join(texts)


@pytest.mark.slow
def test_logit_bias_out_of_vocabulary_is_a_400(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": "edgeserve", "prompt": "hi", "max_tokens": 2,
                         "logit_bias": {"99999999": 5}},
                   timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logit_bias"
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": "edgeserve", "prompt": "hi", "max_tokens": 2, "logit_bias": {"red": 5}},
                   timeout=60)
    assert r.status_code == 400


def test_upstream_sse_lines_split_only_where_sse_does() -> None:
    import asyncio

    from server.gateway.backends.upstream_protocol import sse_lines

    payload = 'data: {"choices":[{"text":"a\u2028b\x85c"}]}\r\n\r\ndata: [DONE]\n\n'.encode()

    async def chunks():
        for i in range(0, len(payload), 7):  # cut anywhere, inside characters too
            yield payload[i: i + 7]

    async def lines() -> list[str]:
        return [line async for line in sse_lines(chunks())]

    got = [line for line in asyncio.run(lines()) if line]
    assert got == ['data: {"choices":[{"text":"a\u2028b\x85c"}]}', "data: [DONE]"]
    assert json.loads(got[0][6:])["choices"][0]["text"] == "a\u2028b\x85c"
