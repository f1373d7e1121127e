"""The load a Locust run offers: request shape (prompt length, max_tokens, streaming), from the environment.

The locustfile runs inside Locust's own process, so the tuner hands it the workload through
EDGESERVE_LOADTEST_* environment variables; `Workload.to_env()` and `Workload.from_env()` are the two
ends of that hand-off.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "EDGESERVE_LOADTEST_"

# Short common English words: most tokenizers (SmolLM2, Llama, Gemma) spend one token on each, so a prompt of
# N words is about N tokens plus the chat template's few.
_TEXT = (
    "the quick brown fox jumps over a lazy dog while small birds sing in tall green trees near an old "
    "stone bridge where people walk each day to see the river run down from high hills toward the sea"
)
_WORDS = tuple(_TEXT.split(" "))


class Workload(BaseModel):
    """One user's request, repeated back to back (closed loop: the number of users is the concurrency)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: int = Field(default=64, ge=1, le=1_000_000, description="approximate prompt length")
    max_tokens: int = Field(default=64, ge=1, le=1_000_000)
    stream: bool = True
    # Without it a model that stops early makes throughput depend on what it chose to say; llama-server,
    # SGLang and edgeserve accept it, the OpenAI service does not.
    ignore_eos: bool = True
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    model: str | None = Field(default=None, description="model id; default: the first one /v1/models lists")
    api_key: str | None = None
    request_timeout_s: float = Field(default=300.0, gt=0)
    summary_path: str | None = Field(default=None, description="where the locustfile writes its JSON summary")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Workload:
        """Read EDGESERVE_LOADTEST_<FIELD> variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        return cls.model_validate(values)

    def to_env(self) -> dict[str, str]:
        """The variables that make `from_env` return this workload (None fields are left out)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            text = ("1" if value else "0") if isinstance(value, bool) else str(value)
            env[ENV_PREFIX + name.upper()] = text
        return env


def make_prompt(n_words: int, rng: random.Random) -> str:
    """A prompt of about `n_words` tokens that starts differently each time, so no prefix cache serves it."""
    start = rng.randrange(len(_WORDS))
    words = [_WORDS[(start + i) % len(_WORDS)] for i in range(max(0, n_words - 8))]
    tag = rng.randrange(1_000_000)
    return f"Request {tag}. Continue this text: " + " ".join(words)


def chat_body(workload: Workload, model: str, rng: random.Random) -> dict[str, Any]:
    """The JSON body of one /v1/chat/completions request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": make_prompt(workload.prompt_tokens, rng)}],
        "max_tokens": workload.max_tokens,
        "temperature": workload.temperature,
        "stream": workload.stream,
    }
    if workload.stream:
        body["stream_options"] = {"include_usage": True}
    if workload.ignore_eos:
        body["ignore_eos"] = True
    return body
