"""Speculative decoding through the gateway, with the official openai client: `speculative` in the request
body (off, on, refused where the server has none), the same greedy text either way, and the counters on
/metrics."""

from __future__ import annotations

import httpx
import openai
import pytest

from loadtest.servers import ServerProcess

pytestmark = pytest.mark.slow

CODE = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
ASK = [{"role": "user", "content": f"Repeat this code exactly:\n\n{CODE}"}]


@pytest.fixture(scope="module")
def spec_server(edgeserve) -> ServerProcess:
    # A cache per sequence: a sequence's greedy tokens never depend on what shares its step. No prefix cache:
    # a prompt taken from the cache computes only its last token, in a batch of its own, and on this CPU that
    # can change the first greedy token (bits of a logit); both requests must compute the prompt alike.
    return edgeserve("--n-parallel", "2", "--n-ctx", "512", "--no-kv-unified", "--no-prefix-cache",
                     "--spec-type", "ngram-simple", "--spec-draft-n-max", "6")


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def test_speculation_on_and_off_give_the_same_greedy_text_and_count_on_metrics(spec_server) -> None:
    client = _client(spec_server)

    def ask(speculative: bool) -> str:
        out = client.chat.completions.create(model="edgeserve", messages=ASK, max_tokens=40, temperature=0,  # type: ignore[arg-type]
                                             extra_body={"speculative": speculative})
        return out.choices[0].message.content or ""

    off = ask(False)
    on = ask(True)
    assert on == off and "area" in on
    metrics = httpx.get(spec_server.url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith(("edgeserve_spec_", "edgeserve_engine_tokens_per_step"))}
    assert values["edgeserve_spec_drafted_tokens_total"] > 0
    assert 0 < values["edgeserve_spec_accepted_tokens_total"] <= values["edgeserve_spec_drafted_tokens_total"]
    assert 0 < values["edgeserve_spec_acceptance_ratio"] <= 1
    assert values["edgeserve_engine_tokens_per_step"] > 1


def test_asking_for_speculation_without_it_is_a_400_naming_the_field(embedded_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        embedded_client.chat.completions.create(model="edgeserve", messages=ASK, max_tokens=4,  # type: ignore[arg-type]
                                                extra_body={"speculative": True})
    assert info.value.body["param"] == "speculative"  # type: ignore[index]
    assert "spec-type" in info.value.body["message"]  # type: ignore[index]
    out = embedded_client.chat.completions.create(model="edgeserve", messages=ASK, max_tokens=4,  # type: ignore[arg-type]
                                                  extra_body={"speculative": False})
    assert out.choices[0].finish_reason == "length"
