"""The load of bench/serving_compare.py: request shapes as clients send them, streams, and what was measured.

A shape is one kind of request (greedy or sampled, completions or chat, fixed or mixed prompt lengths). For
a level of C streams, C streams run at once, each sending `rounds` requests back to back. Every request is
streamed with EOS ignored and a fixed number of generated tokens, so every server does the same work; the
prompts are the same for every server (seeded), distinct per request so no server can share a prefix.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtest.workload import vary  # one home for "sampling as users send it"

# Words that are one token in both the Llama-3 and the SmolLM2 vocabularies (with their leading space).
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out more"
)
WORDS = _WORDS.split()


@dataclass(frozen=True)
class Shape:
    """One request shape. `prompt_tokens` is a fixed length, or (low, high) for lengths drawn per request
    (log-uniformly, or uniformly with `uniform`); `sampling` holds the request's sampling fields (what a chat
    client sends). A `varied` shape draws each request's route and sampling fields itself (`vary`)."""

    name: str
    route: str  # "completions" | "chat" | "mixed" (each request draws one)
    sampling: dict[str, Any]
    prompt_tokens: int | tuple[int, int]
    rounds: int = 2
    about: str = ""
    only_levels: tuple[int, ...] | None = None  # stream counts this shape runs at (None: all asked for)
    uniform: bool = False
    varied: bool = False

    def levels_for(self, levels: list[int]) -> list[int]:
        return [c for c in levels if self.only_levels is None or c in self.only_levels]

    def prompt_length(self, rng: random.Random) -> int:
        if isinstance(self.prompt_tokens, int):
            return self.prompt_tokens
        lo, hi = self.prompt_tokens
        if self.uniform:
            return rng.randint(lo, hi)
        return round(lo * (hi / lo) ** rng.random())

    def request(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        """This request's route and sampling fields."""
        if not self.varied:
            return self.route, dict(self.sampling)
        return rng.choice(("chat", "completions")), vary(rng)


SAMPLED_LEVELS = (1, 8, 32, 64)
SHAPES: dict[str, Shape] = {
    "greedy": Shape("greedy", "completions", {"temperature": 0}, 256, rounds=1,
                    about="completions, temperature 0, 256-token prompts, one round (llama-batched-bench's "
                          "shape: every prefill first, then decode)"),
    "sampled": Shape("sampled", "completions", {"temperature": 0.7, "top_p": 0.95}, (32, 1024),
                     about="completions, temperature 0.7 + top_p 0.95 (what chat clients send; top_k and "
                           "min_p are each server's default), prompts of 32-1024 tokens",
                     only_levels=SAMPLED_LEVELS),
    "sampled-full": Shape("sampled-full", "completions",
                          {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                           "repeat_penalty": 1.1, "presence_penalty": 0.3, "frequency_penalty": 0.3},
                          (32, 1024),
                          about="completions, temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat "
                                "1.1, presence 0.3, frequency 0.3, prompts of 32-1024 tokens",
                          only_levels=SAMPLED_LEVELS),
    "chat": Shape("chat", "chat", {"temperature": 0.7, "top_p": 0.95}, (32, 1024),
                  about="chat completions, temperature 0.7 + top_p 0.95, prompts of 32-1024 tokens",
                  only_levels=SAMPLED_LEVELS),
    "mixed": Shape("mixed", "mixed", {}, (30, 1500), uniform=True, varied=True,
                   about="what users send: half chat, half completions, prompts of 30-1,500 tokens drawn "
                         "uniformly, every request its own temperature (0.6-1.1) and top_p (0.9-1.0), some a "
                         "top_k, min_p, presence/frequency or repeat penalty",
                   only_levels=SAMPLED_LEVELS),
}


def make_prompt(i: int, n_words: int) -> str:
    rng = random.Random(i)
    return f"Request {i:06d}:" + "".join(" " + rng.choice(WORDS) for _ in range(n_words))


@dataclass
class Sample:
    """One streamed request: when its content chunks came and how many tokens it generated."""

    stream: int
    round: int
    prompt_tokens: int | None
    generated_tokens: int
    start_s: float  # sent at, from the start of the level
    ttft_s: float
    decode_s: float  # first to last content chunk
    gaps_s: list[float]  # between consecutive content chunks


@dataclass
class Run:
    server: str
    shape: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    samples: list[Sample]
    engine_profile: dict[str, float] | None = None  # edgeserve only: seconds per step phase, per step
    generated_tokens: int = field(init=False)
    tokens_per_s: float = field(init=False)
    decode_tokens_per_s: float | None = field(init=False)
    ttft_p50_s: float | None = field(init=False)
    itl_p50_s: float | None = field(init=False)
    itl_p90_s: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.generated_tokens = sum(s.generated_tokens for s in self.samples)
        self.tokens_per_s = self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0
        self.ttft_p50_s = quantile([s.ttft_s for s in self.samples], 0.5)
        gaps = [g for s in self.samples for g in s.gaps_s]
        self.itl_p50_s = quantile(gaps, 0.5)
        self.itl_p90_s = quantile(gaps, 0.9)
        # Decode tokens (all but each request's first) / time during which at least one request was decoding:
        # the sum of the streams' decode rates where they decode side by side.
        spans = sorted((s.start_s + s.ttft_s, s.start_s + s.ttft_s + s.decode_s)
                       for s in self.samples if s.decode_s > 0)
        busy, end = 0.0, float("-inf")
        for lo, hi in spans:
            busy += max(0.0, hi - max(lo, end))
            end = max(end, hi)
        decoded = sum(s.generated_tokens - 1 for s in self.samples if s.decode_s > 0)
        self.decode_tokens_per_s = decoded / busy if busy > 0 else None


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _body(route: str, sampling: dict[str, Any], prompt: str, gen: int, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": gen, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}, **sampling}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """Lines split where SSE splits them. httpx's aiter_lines also splits at U+2028, U+0085, ..., which a
    server may leave raw inside a JSON string (llama-server does), and the line would arrive cut in two."""
    buf = b""
    async for chunk in response.aiter_bytes():
        *lines, buf = (buf + chunk).split(b"\n")
        for raw in lines:
            yield raw.rstrip(b"\r").decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")


def _content(payload: dict[str, Any]) -> bool:
    for choice in payload.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def request(client: httpx.AsyncClient, url: str, shape: Shape, prompt: str, gen: int, model: str,
                  stream: int = 0, rnd: int = 0, origin: float = 0.0, key: str = "") -> Sample:
    """One streamed request; tokens from the usage chunk (every server here sends one when asked). A varied
    shape draws the route and sampling from `key` (the request's place in the load), so every server gets
    the same requests."""
    route, sampling = shape.request(random.Random(key or prompt))
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    times: list[float] = []
    finish = False
    usage: dict[str, Any] | None = None
    t0 = time.perf_counter()
    async with client.stream("POST", url + path, json=_body(route, sampling, prompt, gen, model)) as response:
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in sse_lines(response):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                continue  # read on to the end of the body: some servers free the slot only then
            payload = json.loads(data)
            if "error" in payload:
                raise ValueError(f"error in stream: {payload['error']}")
            usage = payload.get("usage") or usage
            finish = finish or any(c.get("finish_reason") for c in payload.get("choices") or ())
            if _content(payload):
                times.append(time.perf_counter())
    if not times or not finish:
        raise ValueError(f"stream ended without a finish_reason after {len(times)} content chunks")
    generated = int(usage["completion_tokens"]) if usage else len(times)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return Sample(stream, rnd, int(usage["prompt_tokens"]) if usage else None, generated, t0 - origin,
                  times[0] - t0, times[-1] - times[0], gaps)


async def load(url: str, model: str, shape: Shape, c: int, gen: int, words_per_token: float,
               seed: int, salt: int = 0) -> tuple[float, list[Sample | BaseException]]:
    """C streams of `shape.rounds` requests each. Returns the wall time and each request's sample or error.
    Another `salt` gives other words of the same lengths and the same sampling (no prefix a server kept
    from an earlier run can be reused)."""
    rng = random.Random(seed)
    lengths = [[shape.prompt_length(rng) for _ in range(shape.rounds)] for _ in range(c)]
    prompts = [[make_prompt(salt * 10_000_000 + seed + k * shape.rounds + r,
                            max(1, round(lengths[k][r] * words_per_token)))
                for r in range(shape.rounds)] for k in range(c)]
    return await load_prompts([url], model, shape, prompts, gen, seed)


async def load_prompts(urls: list[str], model: str, shape: Shape, prompts: list[list[str]],
                       gen: int, seed: int = 0) -> tuple[float, list[Sample | BaseException]]:
    """One stream per list of prompts, sent back to back; stream k goes to urls[k % len(urls)] (a client
    spreading itself over servers). Returns the wall time and each request's sample or error."""
    c = len(prompts)
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()

        async def stream(k: int) -> list[Sample | BaseException]:
            out: list[Sample | BaseException] = []
            url = urls[k % len(urls)]
            for r, prompt in enumerate(prompts[k]):
                try:
                    out.append(await request(client, url, shape, prompt, gen, model, k, r, t0,
                                             key=f"{seed}/{k}/{r}"))
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    out.append(exc)
            return out

        results = [x for per in await asyncio.gather(*(stream(k) for k in range(c))) for x in per]
        return time.perf_counter() - t0, results


def words_per_token(url: str, model: str) -> float:
    """Words of make_prompt per prompt token on this server's tokenizer (one calibration request)."""
    n = 400
    body = {"model": model, "prompt": make_prompt(0, n), "max_tokens": 1}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return n / int(r.json()["usage"]["prompt_tokens"])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
