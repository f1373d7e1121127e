"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.gateway.state import StateDep

router = APIRouter(tags=["health"])


@router.get("/health", response_model=None)
async def health(state: StateDep) -> JSONResponse:
    """Alive and of use: 200 while the model loads and while draining; 503 once the model failed to load
    (nothing in this process will load it later)."""
    if state.load_error is not None:
        return JSONResponse({"status": "error", "reason": f"model failed to load: {state.load_error}"},
                            status_code=503)
    return JSONResponse({"status": "draining" if state.draining else "ok"})


@router.get("/ready", response_model=None)
async def ready(state: StateDep) -> JSONResponse:
    """200 when the model is loaded and a request would be admitted; 503 with Retry-After otherwise."""
    snap = state.admission.snapshot()
    body: dict[str, object] = {
        "backend": state.backend.name,
        "model": state.model_id,
        "in_flight": snap.in_flight,
        "queued": snap.waiting,
        "slots": snap.limit,
        "max_queue": snap.max_queue,
    }
    placement = getattr(state.backend, "placement", None)
    if placement is not None:  # the embedded engine: what it really runs on
        body["runs_on"] = placement()
    member_states = getattr(state.backend, "member_states", None)
    if member_states is not None:  # a fallback chain: which members serve, and why one is out
        body["backends"] = member_states()
    if state.load_error is not None:
        # Permanent: no Retry-After, since waiting cannot help.
        body.update(status="error", reason=f"model failed to load: {state.load_error}")
        return JSONResponse(body, status_code=503)
    if state.draining:
        body.update(status="draining", reason="the server is shutting down")
    elif not state.is_loaded:
        body.update(status="loading", reason="model is loading")
    elif not state.backend.is_ready():
        body.update(status="unavailable", reason=f"backend {state.backend.name} is not ready")
    elif snap.in_flight >= snap.limit and snap.waiting >= snap.max_queue:
        body.update(status="busy", reason="every slot is busy and the queue is full")
    else:
        body.update(status="ready", n_ctx=state.backend.n_ctx)
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers=state.retry_after())
