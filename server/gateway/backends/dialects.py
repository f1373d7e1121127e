"""How each kind of OpenAI-compatible server wants the fields beyond plain sampling, and which it supports.

A dialect is named in the settings (`upstream_dialect`, a chain member's `dialect`) or found out from the
server's /v1/models (`owned_by`). What a dialect lacks is refused before the request is sent
(backends/features.py); what it has goes out under the server's own names:

- llama-server: `json_schema` and `grammar` (its native fields, read on both routes), top_k 0 = off, tools
  (its --jinja templates), no `n` (edgeserve sends n requests and merges them).
- SGLang: response_format on both routes, a grammar as `ebnf`, top_k -1 = off (0 is an error), tools
  (with --tool-call-parser), n.
- llama-cpp-python's server: response_format on chat, `grammar`, no n, no tools (its chat formats differ).
- edgeserve: everything edgeserve accepts.
- openai: OpenAI's own fields only (response_format on chat, tools, n); no grammar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from server.gateway.backends.base import BackendError, GenerationJob
from server.gateway.backends.features import (
    ALL_FEATURES,
    EMBEDDINGS,
    GRAMMAR,
    JSON_SCHEMA,
    LOGIT_BIAS,
    TOKEN_PROMPT,
    TOOLS,
    N,
)

SchemaStyle = Literal["native", "response_format", "chat_only"]


@dataclass(frozen=True)
class Dialect:
    name: str
    features: frozenset[str]
    top_k_off: int | None  # what means "no top-k" (None: leave top_k out)
    native_n: bool
    grammar_field: str | None
    schema_style: SchemaStyle  # native: llama-server's json_schema field; chat_only: response_format on chat
    sends_min_p: bool  # llama-server's default min_p is 0.05: an explicit 0 must be sent


DIALECTS: dict[str, Dialect] = {
    "edgeserve": Dialect("edgeserve", ALL_FEATURES, 0, True, "grammar", "response_format", True),
    "llama-server": Dialect("llama-server", ALL_FEATURES, 0, False, "grammar", "native", True),
    "sglang": Dialect("sglang", ALL_FEATURES, -1, True, "ebnf", "response_format", False),
    "llama-cpp-python": Dialect("llama-cpp-python",
                                frozenset({GRAMMAR, JSON_SCHEMA, LOGIT_BIAS, N, EMBEDDINGS}),
                                0, False, "grammar", "chat_only", True),
    "openai": Dialect("openai", frozenset({JSON_SCHEMA, TOOLS, N, LOGIT_BIAS, TOKEN_PROMPT, EMBEDDINGS}),
                      None, True, None, "chat_only", False),
}
DEFAULT_DIALECT = "openai"
# /v1/models `owned_by` -> dialect
OWNERS = {"edgeserve": "edgeserve", "llamacpp": "llama-server", "sglang": "sglang", "me": "llama-cpp-python"}


def dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(
            f"unknown upstream dialect {name!r}; supported: auto, {', '.join(DIALECTS)}") from None


def _response_format(job: GenerationJob) -> dict[str, Any]:
    c = job.constraint
    assert c is not None
    if c.kind == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": c.name or "output", "schema": c.schema}
    if c.strict:
        spec["strict"] = True
    return {"type": "json_schema", "json_schema": spec}


def extra_fields(job: GenerationJob, d: Dialect) -> dict[str, Any]:
    """The body fields for the job's constraint, tools, logit bias and top-k in dialect `d`."""
    body: dict[str, Any] = {}
    p = job.params
    if p.top_k:
        body["top_k"] = p.top_k
    elif d.top_k_off is not None:
        body["top_k"] = d.top_k_off
    if d.sends_min_p or p.min_p:
        body["min_p"] = p.min_p
    if p.logit_bias:
        # OpenAI's -100 is a ban: edgeserve's -inf goes back to it.
        body["logit_bias"] = {str(t): (-100.0 if math.isinf(b) else b) for t, b in p.logit_bias}
    c = job.constraint
    if c is not None:
        if c.kind == "grammar":
            assert d.grammar_field is not None
            body[d.grammar_field] = c.grammar
        elif d.schema_style == "native":
            body["json_schema"] = c.schema
        elif d.schema_style == "response_format" or job.kind == "chat":
            body["response_format"] = _response_format(job)
        elif d.grammar_field is not None:  # a completion, to a server with response_format on chat only
            body[d.grammar_field] = c.grammar
        else:
            raise BackendError(f"a {d.name} server takes response_format on chat completions only",
                               status_code=400, code="unsupported_feature", retryable=False,
                               param="response_format")
    if job.tools is not None:
        body["tools"] = list(job.tools.tools)
        if job.tools.choice is not None:
            body["tool_choice"] = job.tools.choice
        if not job.tools.parallel:
            body["parallel_tool_calls"] = False
    if job.n > 1 and d.native_n:
        body["n"] = job.n
    if job.prompt_tokens is not None:
        body["prompt"] = list(job.prompt_tokens)
    return body
