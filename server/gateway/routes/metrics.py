"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.gateway.state import StateDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Request, latency, token, queue, engine and (with a GPU) device figures."""
    # GPU gauges are read from NVML at scrape time (milliseconds per device): not on the event loop.
    body = await asyncio.to_thread(state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
