"""The load a Locust run offers: requests, prompts, sampling, output length, rate and shape.

It says which requests go (chat or completions, streamed or not, in what mix), with which prompts (from the
shipped set) and sampling, how many tokens each generates, at what offered rate and in what load shape.

The locustfile runs inside Locust's own process, so the tuner hands it the workload through
EDGESERVE_LOADTEST_* environment variables; `Workload.to_env()` and `Workload.from_env()` are the two
ends of that hand-off.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loadtest.prompts import LENGTHS, Length, Prompt, fresh, select

ENV_PREFIX = "EDGESERVE_LOADTEST_"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# What one request is: the route and whether it streams. The mix names them with weights,
# e.g. "chat-stream:3,completion:1".
KINDS: dict[str, tuple[str, bool]] = {
    "chat-stream": (CHAT_PATH, True),
    "chat": (CHAT_PATH, False),
    "completion-stream": (COMPLETIONS_PATH, True),
    "completion": (COMPLETIONS_PATH, False),
}
# The chat template wraps the prompt in a few tokens of its own; leave room for them when checking fit.
TEMPLATE_TOKENS = 32


def parse_mix(text: str) -> dict[str, int]:
    """'chat-stream:3,completion' -> {'chat-stream': 3, 'completion': 1}; unknown kinds are an error."""
    mix: dict[str, int] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        name, _, weight = part.partition(":")
        if name not in KINDS:
            raise ValueError(f"unknown request kind {name!r}; known: {', '.join(KINDS)}")
        try:
            mix[name] = int(weight) if weight else 1
        except ValueError:
            raise ValueError(f"weight of {name!r} is not a whole number: {weight!r}") from None
        if mix[name] < 1:
            raise ValueError(f"weight of {name!r} must be at least 1")
    if not mix:
        raise ValueError(f"the request mix names no kind; known: {', '.join(KINDS)}")
    return mix


def parse_lengths(text: str) -> tuple[Length, ...]:
    """'short,long' -> ('short', 'long'), in the shipped order; unknown ones are an error."""
    names = {p for p in text.replace(" ", "").split(",") if p}
    unknown = sorted(names - set(LENGTHS))
    if unknown or not names:
        raise ValueError(f"prompt lengths {', '.join(unknown) or '(none)'} unknown; "
                         f"known: {', '.join(LENGTHS)}")
    return tuple(n for n in LENGTHS if n in names)


class Workload(BaseModel):
    """What every Locust user sends, one request after another (closed loop) or paced to `rate_rps` in all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mix: str = Field(default="chat-stream", description="request kinds with weights, e.g. chat-stream:3,chat")
    prompt_lengths: str = Field(default="short,medium,long", description="which shipped prompts to send")
    max_prompt_tokens: int = Field(default=1024, ge=16, description="leave out longer shipped prompts")
    max_tokens: int = Field(default=64, ge=1, le=1_000_000)
    # Without it a model that stops early makes throughput depend on what it chose to say; llama-server,
    # SGLang and edgeserve accept it, the OpenAI service does not.
    ignore_eos: bool = True
    # Sampled, as chat clients send them (greedy decoding is the cheap case no client asks for).
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float | None = Field(default=0.95, gt=0.0, le=1.0, description="None: not sent")
    # "varied": every request draws its own sampling fields (`vary`), as traffic from many clients does; a
    # server tuned on one fixed chain can lose on that (the per-request sampler cost differs).
    sampling: Literal["fixed", "varied"] = "fixed"
    rate_rps: float | None = Field(default=None, gt=0, description="requests/s of all users; None: no pacing")
    shape: Literal["constant", "step"] = "constant"
    step_users: int = Field(default=1, ge=1, description="step shape: users added at each step")
    step_s: float = Field(default=10.0, gt=0, description="step shape: seconds between steps")
    model: str | None = Field(default=None, description="model id; default: the first one /v1/models lists")
    api_key: str | None = None
    request_timeout_s: float = Field(default=300.0, gt=0)
    summary_path: str | None = Field(default=None, description="where the locustfile writes its JSON summary")

    @field_validator("mix")
    @classmethod
    def _check_mix(cls, value: str) -> str:
        parse_mix(value)
        return value

    @field_validator("prompt_lengths")
    @classmethod
    def _check_lengths(cls, value: str) -> str:
        parse_lengths(value)
        return value

    @property
    def weights(self) -> dict[str, int]:
        return parse_mix(self.mix)

    @property
    def streams(self) -> bool:
        """Whether any request streams (TTFT and ITL are measured on those only)."""
        return any(KINDS[k][1] for k in self.weights)

    @property
    def request_tokens(self) -> int:
        """The most one request can need of a sequence's context: prompt, template and completion."""
        return self.max_prompt_tokens + TEMPLATE_TOKENS + self.max_tokens

    def prompts(self) -> tuple[Prompt, ...]:
        return select(parse_lengths(self.prompt_lengths), self.max_prompt_tokens)

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


def vary(rng: random.Random) -> dict[str, Any]:
    """Sampling fields as different clients send them: every request its own temperature and top_p, some a
    top_k, a min_p, penalties (OpenAI's presence/frequency, llama.cpp's repeat)."""
    out: dict[str, Any] = {"temperature": round(rng.uniform(0.6, 1.1), 2),
                           "top_p": round(rng.uniform(0.9, 1.0), 2)}
    if rng.random() < 0.3:
        out["top_k"] = rng.choice((20, 40, 64))
    if rng.random() < 0.3:
        out["min_p"] = rng.choice((0.02, 0.05, 0.1))
    if rng.random() < 0.3:
        out["presence_penalty"] = round(rng.uniform(0.0, 0.5), 2)
        out["frequency_penalty"] = round(rng.uniform(0.0, 0.5), 2)
    if rng.random() < 0.15:
        out["repeat_penalty"] = 1.1
    return out


def request_body(workload: Workload, kind: str, model: str, prompt: Prompt, rng: random.Random
                 ) -> dict[str, Any]:
    """The JSON body of one request of `kind` (see KINDS), as an OpenAI client sends it."""
    path, stream = KINDS[kind]
    text = fresh(prompt, rng)
    body: dict[str, Any] = {"model": model, "max_tokens": workload.max_tokens, "stream": stream}
    if workload.sampling == "varied":
        body.update(vary(rng))
    else:
        body["temperature"] = workload.temperature
        if workload.top_p is not None:
            body["top_p"] = workload.top_p
    if path == CHAT_PATH:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    if workload.ignore_eos:
        body["ignore_eos"] = True
    return body
