"""A remote OpenAI-compatible server (llama-server, SGLang, another edgeserve) as a backend.

One pooled httpx.AsyncClient for the backend's lifetime. Every job is sent with `stream: true` (whatever the
client asked) so deltas, first-token timing and cancellation work the same for both kinds of client: closing
the delta iterator closes the upstream connection, which llama-server and SGLang take as a cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from server.gateway.backends.base import (
    BackendError,
    BackendUnavailableError,
    Delta,
    GenerationJob,
    TokenLogprob,
)
from server.gateway.backends.upstream_errors import is_error_payload, map_error, parse_json
from server.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


def request_body(job: GenerationJob, model: str) -> dict[str, Any]:
    """The upstream request for `job`: OpenAI fields plus the llama.cpp / SGLang extras that are set."""
    p = job.params
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if job.kind == "chat":
        messages = list(job.messages)
        if job.continuation:
            # llama-server and SGLang continue a trailing assistant message instead of starting a new one.
            messages.append({"role": "assistant", "content": job.continuation})
        body["messages"] = messages
    else:
        body["prompt"] = job.prompt + job.continuation
    # Without max_tokens llama-server generates until the context is full; completions always carry one.
    if job.extra.get("max_tokens_explicit", True) or job.kind == "completion":
        body["max_tokens"] = p.max_tokens
    body["temperature"] = p.temperature
    body["top_p"] = p.top_p
    if p.top_k:
        body["top_k"] = p.top_k
    if p.min_p:
        body["min_p"] = p.min_p
    if p.repeat_penalty != 1.0:
        body["repeat_penalty"] = p.repeat_penalty  # llama-server's name
        body["repetition_penalty"] = p.repeat_penalty  # SGLang's and vLLM's
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        body["frequency_penalty"] = p.frequency_penalty
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.ignore_eos:
        body["ignore_eos"] = True
    if p.logprobs is not None:
        if job.kind == "chat":
            body["logprobs"] = True
            body["top_logprobs"] = p.logprobs
        else:
            body["logprobs"] = p.logprobs
    return body


def _chunk_logprobs(choice: dict[str, Any], kind: str) -> tuple[TokenLogprob, ...]:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return ()
    if kind == "chat":
        entries = lp.get("content") or []
        return tuple(
            TokenLogprob(token=str(e.get("token", "")), logprob=float(e.get("logprob", 0.0)),
                         token_bytes=tuple(e.get("bytes") or ()))
            for e in entries if isinstance(e, dict)
        )
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    return tuple(TokenLogprob(token=str(t), logprob=float(v or 0.0))
                 for t, v in zip(tokens, values, strict=False))


class OpenAIUpstreamBackend:
    """Streams jobs from a remote /v1/chat/completions or /v1/completions."""

    name = "openai"

    def __init__(self, base_url: str, *, api_key: str | None = None, slots: int = 4, n_ctx: int | None = None,
                 model: str | None = None, connect_timeout_s: float = 5.0,
                 health_interval_s: float = 2.0, health_url: str | None = None) -> None:
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self._api_key = api_key
        self._slots = slots
        self._n_ctx_override = n_ctx
        self._n_ctx_seen: int | None = None
        self.model_id: str | None = model
        self._model_fixed = model is not None
        self._connect_timeout_s = connect_timeout_s
        self._health_interval_s = health_interval_s
        # llama-server and SGLang answer /health; llama-cpp-python's server has none (use /v1/models there).
        self._health_url = health_url or "/health"
        self._client: httpx.AsyncClient | None = None
        self._poller: asyncio.Task[None] | None = None
        self._is_healthy = False

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> OpenAIUpstreamBackend:
        if not settings.upstream_url:
            raise ValueError("the openai backend needs an upstream URL")
        return cls(settings.upstream_url, api_key=settings.upstream_api_key, slots=settings.parallel,
                   n_ctx=settings.ctx, connect_timeout_s=settings.upstream_connect_timeout_s,
                   health_interval_s=settings.upstream_health_interval_s)

    @property
    def n_ctx(self) -> int:
        """The context per sequence: --ctx if given, else what the upstream reports, else 0 (unknown)."""
        return self._n_ctx_override or self._n_ctx_seen or 0

    @property
    def slots(self) -> int:
        return self._slots

    def is_ready(self) -> bool:
        return self._client is not None and self._is_healthy

    def count_prompt_tokens(self, job: GenerationJob) -> int | None:
        return None  # only the upstream can tell; it answers context errors itself

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            # No read timeout: a long generation may pause; the gateway's request timeout bounds it.
            timeout=httpx.Timeout(connect=self._connect_timeout_s, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=self._slots + 4, max_keepalive_connections=self._slots + 4),
        )
        await self._probe()
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
            self._poller = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._is_healthy = False

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            await self._probe()

    async def _probe(self) -> None:
        """Health, then (once) the model id and context size the upstream reports."""
        assert self._client is not None
        try:
            health = await self._client.get(self._health_url, timeout=self._connect_timeout_s)
            healthy = health.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy != self._is_healthy:
            log.info("upstream %s is %s", self.base_url, "up" if healthy else "down")
        self._is_healthy = healthy
        if healthy and (self._n_ctx_seen is None or self.model_id is None):
            await self._discover()

    async def _discover(self) -> None:
        assert self._client is not None
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            models = (await self._client.get("/v1/models", timeout=self._connect_timeout_s)).json()
            card = models["data"][0]
            if not self._model_fixed and card.get("id"):
                self.model_id = str(card["id"])
            # vLLM, SGLang and edgeserve report max_model_len.
            if card.get("max_model_len"):
                self._n_ctx_seen = int(card["max_model_len"])
                return
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            props = await self._client.get("/props", timeout=self._connect_timeout_s)
            if props.status_code == 200:
                # llama-server: the per-slot context of its default generation settings.
                self._n_ctx_seen = int(props.json()["default_generation_settings"]["n_ctx"])

    def generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        return self._generate(job)

    async def _generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        if self._client is None:
            raise BackendUnavailableError("the upstream backend is not started")
        path = "/v1/chat/completions" if job.kind == "chat" else "/v1/completions"
        body = request_body(job, self.model_id or job.model)
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raw = (await response.aread()).decode(errors="replace")
                    raise map_error(response.status_code, parse_json(raw), job.kind, text=raw[:500])
                async for delta in self._deltas(response, job):
                    yield delta
        except httpx.ConnectError as exc:
            self._is_healthy = False
            raise BackendUnavailableError(f"cannot reach upstream {self.base_url}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise BackendUnavailableError(f"upstream {self.base_url} timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {self.base_url} failed: {exc}", status_code=502,
                               code="upstream_error") from exc

    async def _deltas(self, response: httpx.Response, job: GenerationJob) -> AsyncIterator[Delta]:
        prompt_tokens = 0
        reported_tokens: int | None = None
        chunks_seen = 0
        finish_reason: str | None = None
        async for line in response.aiter_lines():
            if not line or line.startswith(":"):
                continue
            field, _, data = line.partition(":")
            data = data.strip()
            if field == "error":
                raise map_error(500, parse_json(data), job.kind, text=data)
            if field != "data":
                continue
            if data == "[DONE]":
                break
            chunk = parse_json(data)
            if is_error_payload(chunk):
                status = chunk.get("error", {}).get("code") if isinstance(chunk.get("error"), dict) else None
                raise map_error(status if isinstance(status, int) else 500, chunk, job.kind, text=data)
            if not isinstance(chunk, dict):
                continue
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
                if usage.get("completion_tokens") is not None:
                    reported_tokens = int(usage["completion_tokens"])
            for choice in chunk.get("choices") or ():
                if job.kind == "chat":
                    text = (choice.get("delta") or {}).get("content") or ""
                else:
                    text = choice.get("text") or ""
                logprobs = _chunk_logprobs(choice, job.kind)
                if text or logprobs:
                    # Until usage arrives, count about one token per chunk (what streaming servers send).
                    chunks_seen += 1
                    yield Delta(text=text, prompt_tokens=prompt_tokens, completion_tokens=chunks_seen,
                                logprobs=logprobs)
                if choice.get("finish_reason"):
                    finish_reason = str(choice["finish_reason"])
        # The usage chunk follows the finish chunk, so the finish goes out last, with the final counts.
        yield Delta(text="", finish_reason=finish_reason or "stop", prompt_tokens=prompt_tokens,
                    completion_tokens=reported_tokens if reported_tokens is not None else chunks_seen)
