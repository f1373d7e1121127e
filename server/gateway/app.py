"""The FastAPI app factory. The lifespan owns the backend: it starts loading it and stops it at shutdown.

The model loads in the background so /health answers at once and /ready says 503 until it is done, the way
llama-server behaves; generation routes answer 503 with Retry-After meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from server.gateway.admission import Admission
from server.gateway.backends.base import Backend
from server.gateway.errors import install_error_handlers
from server.gateway.generation import CLIENT_CLOSED_STATUS, ClientDisconnectedError
from server.gateway.metrics import GatewayMetrics, RequestMetricsMiddleware
from server.gateway.routes import embeddings, gpu, health, metrics, openai, worker
from server.gateway.security import BodySizeLimitMiddleware, verify_metrics_access
from server.gateway.settings import GatewaySettings
from server.gateway.state import GatewayState

log = logging.getLogger(__name__)


def build_backend(settings: GatewaySettings) -> Backend:
    """The backend the settings ask for (imported lazily: the upstream path needs no llama.cpp)."""
    if settings.models_file is not None:
        from server.gateway.models.models_file import load_models_file
        from server.gateway.models.pool import ModelPool

        return ModelPool.build(load_models_file(settings.models_file))
    if settings.chain_config is not None:
        from server.gateway.chain_config import load_chain
        from server.gateway.fallback import FallbackBackend

        return FallbackBackend.from_config(load_chain(settings.chain_config))
    if settings.backend == "openai":
        from server.gateway.backends.openai_upstream import OpenAIUpstreamBackend

        return OpenAIUpstreamBackend.from_settings(settings)
    from server.gateway.backends.embedded import EmbeddedBackend

    return EmbeddedBackend.from_settings(settings)


def _gpu_sampler(settings: GatewaySettings):  # type: ignore[no-untyped-def]
    if not settings.enable_gpu_metrics:
        return None
    from server.hardware.detect import sample_gpu_metrics

    return sample_gpu_metrics


def _fatal(state: GatewayState, reason: str) -> None:
    """The backend can no longer serve and will not recover in this process: exit rather than look alive."""
    state.load_error = reason
    log.error("backend %s failed for good: %s", state.backend.name, reason)
    if state.on_fatal is not None:
        state.on_fatal(reason)


async def _load(state: GatewayState) -> None:
    started = time.monotonic()
    try:
        await state.backend.start()
    except Exception as exc:
        # Nothing in this process will load it later: a server that cannot serve should not look alive.
        _fatal(state, str(exc) or type(exc).__name__)
        return
    if hasattr(state.backend, "on_fatal"):
        state.backend.on_fatal = lambda reason: _fatal(state, reason)
    # Slots are known only once the backend is up (the engine decides its own count).
    state.admission.limit = max(1, state.backend.slots)
    log.info("backend %s ready in %.1f s: model %s, %d slots, %d tokens of context per sequence",
             state.backend.name, time.monotonic() - started, state.model_id, state.backend.slots,
             state.backend.n_ctx)


def create_app(settings: GatewaySettings | None = None, backend: Backend | None = None) -> FastAPI:
    """The gateway app. `backend` defaults to the one `settings.backend` names; the app starts/stops it."""
    settings = settings or GatewaySettings()
    backend = backend or build_backend(settings)
    gateway_metrics = GatewayMetrics(gpu_sampler=_gpu_sampler(settings))
    # A fallback chain queues per backend itself; a second queue in front of it would only add waiting.
    admission = Admission(limit=settings.engine.n_parallel,
                          max_queue=0 if getattr(backend, "has_own_queue", False) else settings.max_queue)
    bind_registry = getattr(backend, "bind_registry", None)
    if bind_registry is not None:
        bind_registry(gateway_metrics.registry)
    state = GatewayState(settings=settings, backend=backend, admission=admission, metrics=gateway_metrics,
                         created=int(time.time()))
    gateway_metrics.bind(admission, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loader = asyncio.create_task(_load(state))
        try:
            yield
        finally:
            if not state.loader.done():
                state.loader.cancel()
                with contextlib.suppress(BaseException):
                    await state.loader
            try:
                await backend.stop()
            except Exception:
                log.exception("backend %s did not stop cleanly", backend.name)

    app = FastAPI(title="edgeserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway over llama.cpp, llama-server or SGLang")
    app.state.gateway = state
    install_error_handlers(app)

    async def _client_closed(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_STATUS)

    app.add_exception_handler(ClientDisconnectedError, _client_closed)
    for router in (health.router, openai.router, embeddings.router, gpu.router, worker.router):
        app.include_router(router)
    app.include_router(metrics.router, dependencies=[Depends(verify_metrics_access)])
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=gateway_metrics)
    return app


def app_from_env() -> FastAPI:
    """`uvicorn --factory server.gateway.app:app_from_env`: settings from EDGESERVE_* variables."""
    return create_app(GatewaySettings())
