"""What the app holds for its lifetime, and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.gateway.admission import Admission
from server.gateway.backends.base import Backend
from server.gateway.errors import APIError
from server.gateway.metrics import GatewayMetrics
from server.gateway.sampling_defaults import SamplingDefaults, sampling_defaults
from server.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass
class GatewayState:
    """Live objects shared by all requests of one app (mutable: the backend loads in the background)."""

    settings: GatewaySettings
    backend: Backend
    admission: Admission
    metrics: GatewayMetrics
    loader: asyncio.Task[None] | None = None
    load_error: str | None = None
    created: int = field(default=0)
    # Shutdown: `draining` from the first SIGTERM (new requests get 503); `ending` is set when the grace
    # period is over and every stream still running must end now, properly.
    draining: bool = False
    ending: asyncio.Event = field(default_factory=asyncio.Event)
    # Called when the backend failed to load for good: the server should exit rather than look alive.
    on_fatal: Callable[[str], None] | None = None

    @property
    def model_id(self) -> str:
        """The id clients see: the configured name, else the backend's name for its model (once loaded)."""
        if self.settings.model_name:
            return self.settings.model_name
        return str(getattr(self.backend, "model_id", None) or self.backend.name)

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        return sampling_defaults(self.settings.sampling_defaults)

    @property
    def is_loaded(self) -> bool:
        return self.loader is not None and self.loader.done() and self.load_error is None

    def is_ready(self) -> bool:
        return self.is_loaded and self.backend.is_ready()

    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    def begin_drain(self, grace_s: float) -> None:
        """Stop taking requests; `grace_s` from now, end whatever still runs. Idempotent; loop thread only."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %.0f s for the requests in flight, then their streams end", grace_s)
        asyncio.get_running_loop().call_later(grace_s, self.ending.set)

    def require_ready(self) -> None:
        """503 while the model loads, the backend is down or the server is shutting down; Retry-After only
        where waiting can help (a model that failed to load will not load later in this process)."""
        if self.load_error is not None:
            raise APIError(503, f"model failed to load: {self.load_error}", code="model_load_failed")
        if self.draining:
            raise APIError(503, "the server is shutting down; retry elsewhere or later",
                           code="server_shutting_down", headers=self.retry_after())
        if not self.is_ready():
            message = ("model is loading" if not self.is_loaded
                       else f"backend {self.backend.name} is not ready")
            raise APIError(503, message, code="model_not_ready", headers=self.retry_after())


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


async def verify_api_key(request: Request, state: StateDep) -> None:
    """Bearer-token check on the API routes when an api_key is configured (constant-time compare)."""
    expected = state.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
