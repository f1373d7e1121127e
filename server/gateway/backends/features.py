"""What a request asks of a backend beyond plain sampling, and what each backend supports.

The features are an output constraint, tools, several choices and logit bias. A backend declares the features
it supports; the gateway refuses, before sending, a request that asks a backend for one it lacks, and the
fallback chain only hands a request to members that have them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Feature names, as they appear in errors and in a chain member's `capabilities`.
GRAMMAR = "grammar"  # a GBNF grammar (llama-server's `grammar`)
JSON_SCHEMA = "json_schema"  # response_format json_object / json_schema, llama-server's `json_schema`
TOOLS = "tools"
N = "n"  # more than one choice
LOGIT_BIAS = "logit_bias"
TOKEN_PROMPT = "token_prompt"  # a completion prompt given as token ids
EMBEDDINGS = "embeddings"
ALL_FEATURES = frozenset({GRAMMAR, JSON_SCHEMA, TOOLS, N, LOGIT_BIAS, TOKEN_PROMPT, EMBEDDINGS})

ConstraintKind = Literal["json_object", "json_schema", "grammar"]


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must be: any JSON object, JSON valid against `schema`, or text of a GBNF grammar.
    `grammar` is the GBNF llama.cpp enforces (for json kinds: converted from the schema)."""

    kind: ConstraintKind
    grammar: str
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = False

    @property
    def feature(self) -> str:
        return GRAMMAR if self.kind == "grammar" else JSON_SCHEMA


ToolMode = Literal["auto", "none", "required", "named"]


@dataclass(frozen=True)
class ToolSpec:
    """The tools offered (OpenAI dicts), how the model may use them, and whether calls may come several."""

    tools: tuple[dict[str, Any], ...]
    mode: ToolMode = "auto"
    function: str | None = None  # mode "named": the one function to call
    parallel: bool = True
    choice: Any = field(default=None, compare=False)  # the client's tool_choice, for upstream servers

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)
