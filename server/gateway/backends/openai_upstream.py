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

import httpx

from server.gateway.backends.base import (
    BackendError,
    BackendUnavailableError,
    Delta,
    EmbeddingInput,
    EmbeddingResult,
    GenerationJob,
)
from server.gateway.backends.dialects import DEFAULT_DIALECT, OWNERS, Dialect, dialect
from server.gateway.backends.fanout import merged_choices
from server.gateway.backends.upstream_errors import map_error, parse_json
from server.gateway.backends.upstream_protocol import (
    EmptyStreamError,
    answer_deltas,
    request_body,
    sse_lines,
    stream_deltas,
)
from server.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class OpenAIUpstreamBackend:
    """Streams jobs from a remote /v1/chat/completions or /v1/completions."""

    name = "openai"

    def __init__(self, base_url: str, *, api_key: str | None = None, n_parallel: int = 4,
                 n_ctx: int | None = None, model: str | None = None, connect_timeout_s: float = 5.0,
                 health_interval_s: float = 2.0, health_url: str | None = None, dialect_name: str = "auto",
                 capabilities: frozenset[str] | None = None) -> None:
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self._api_key = api_key
        self._slots = n_parallel
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
        # "auto": found out from /v1/models' owned_by once the upstream answers.
        self._dialect: Dialect | None = None if dialect_name == "auto" else dialect(dialect_name)
        self._capabilities = capabilities

    @property
    def dialect(self) -> Dialect:
        return self._dialect or dialect(DEFAULT_DIALECT)

    @property
    def features(self) -> frozenset[str]:
        """What the upstream's dialect supports, narrowed by the configured capabilities."""
        found = self.dialect.features
        return found & self._capabilities if self._capabilities is not None else found

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> OpenAIUpstreamBackend:
        if not settings.upstream_url:
            raise ValueError("the openai backend needs an upstream URL")
        return cls(settings.upstream_url, api_key=settings.upstream_api_key,
                   n_parallel=settings.engine.n_parallel, n_ctx=settings.upstream_n_ctx,
                   connect_timeout_s=settings.upstream_connect_timeout_s,
                   health_interval_s=settings.upstream_health_interval_s,
                   dialect_name=settings.upstream_dialect)

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
            if health.status_code == 404 and self._health_url != "/v1/models":
                # No health route (llama-cpp-python's server): a model list means it is up.
                health = await self._client.get("/v1/models", timeout=self._connect_timeout_s)
            healthy = health.status_code == 200
        except httpx.ConnectError:
            healthy = False
        except httpx.TimeoutException:
            # Accepting connections but slow to answer (llama-cpp-python's server holds every route behind its
            # model lock while it generates): busy, not down.
            healthy = self._is_healthy
        except httpx.HTTPError:
            healthy = False
        if healthy != self._is_healthy:
            log.info("upstream %s is %s", self.base_url, "up" if healthy else "down")
        self._is_healthy = healthy
        if healthy and (self._n_ctx_seen is None or self.model_id is None or self._dialect is None):
            await self._discover()

    async def _discover(self) -> None:
        assert self._client is not None
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            models = (await self._client.get("/v1/models", timeout=self._connect_timeout_s)).json()
            card = models["data"][0]
            if self._dialect is None:
                self._dialect = dialect(OWNERS.get(str(card.get("owned_by")), DEFAULT_DIALECT))
                log.info("upstream %s speaks the %s dialect", self.base_url, self._dialect.name)
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
        if job.n > 1 and not self.dialect.native_n:
            # A server without `n`: one request per choice (seeds seed, seed + 1, ...), merged by index.
            return merged_choices(job, self._generate)
        return self._generate(job)

    async def embed(self, inputs: list[EmbeddingInput]) -> EmbeddingResult:
        if self._client is None:
            raise BackendUnavailableError("the upstream backend is not started")
        body = {"model": self.model_id or "", "input": [x if isinstance(x, str) else list(x) for x in inputs]}
        try:
            response = await self._client.post("/v1/embeddings", json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(f"upstream {self.base_url} failed: {exc!r}") from exc
        raw = response.text
        if response.status_code != 200:
            raise map_error(response.status_code, parse_json(raw), "completion", text=raw[:500])
        try:
            answer = response.json()
            data = sorted(answer["data"], key=lambda d: int(d.get("index", 0)))
            vectors = tuple(tuple(float(x) for x in d["embedding"]) for d in data)
            tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"upstream {self.base_url} sent no embeddings: {exc!r}", status_code=502,
                               code="upstream_error") from exc
        return EmbeddingResult(vectors, tokens)

    async def _send(self, path: str, body: dict[str, object]) -> httpx.Response:
        """POST with the response body left to stream; the caller closes the response."""
        assert self._client is not None
        for attempt in (1, 2):
            request = self._client.build_request("POST", path, json=body)
            try:
                return await self._client.send(request, stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                # A pooled keep-alive connection the server had already closed (llama-cpp-python's server
                # drops it after a failed stream): no answer came back, so sending once more is safe.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        if self._client is None:
            raise BackendUnavailableError("the upstream backend is not started")
        path = "/v1/chat/completions" if job.kind == "chat" else "/v1/completions"
        model = self.model_id or job.model
        try:
            response = await self._send(path, request_body(job, model, dialect=self.dialect))
            try:
                if response.status_code != 200:
                    raw = (await response.aread()).decode(errors="replace")
                    raise map_error(response.status_code, parse_json(raw), job.kind, text=raw[:500])
                async for delta in stream_deltas(sse_lines(response.aiter_bytes()), job):
                    yield delta
            except EmptyStreamError:
                # Nothing reached the client yet: ask once more without streaming for the answer or the error.
                await response.aclose()
                body = request_body(job, model, stream=False, dialect=self.dialect)
                response = await self._send(path, body)
                raw = (await response.aread()).decode(errors="replace")
                if response.status_code != 200:
                    raise map_error(response.status_code, parse_json(raw), job.kind, text=raw[:500]) from None
                for delta in answer_deltas(parse_json(raw), job):
                    yield delta
            finally:
                await response.aclose()
        except httpx.ConnectError as exc:
            self._is_healthy = False
            raise BackendUnavailableError(f"cannot reach upstream {self.base_url}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise BackendUnavailableError(f"upstream {self.base_url} timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {self.base_url} failed: {exc!r}", status_code=502,
                               code="upstream_error") from exc
