"""GET /v1/gpu/info: the cards this server runs on (NVML), or the CPU when there is no GPU."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends

from server.gateway.state import StateDep, verify_api_key
from server.hardware.detect import detect, sample_gpu_metrics

router = APIRouter(prefix="/v1/gpu", tags=["gpu"], dependencies=[Depends(verify_api_key)])


@router.get("/info")
async def gpu_info(state: StateDep) -> dict[str, Any]:
    """Cards, memory, utilisation, temperature and power per GPU, the matched card, and the host CPU."""
    # NVML calls block for milliseconds each: keep them off the event loop.
    detection = await asyncio.to_thread(detect)
    samples = await asyncio.to_thread(sample_gpu_metrics) if not detection.is_cpu_only else ()
    placement = getattr(state.backend, "placement", None)
    return {
        "backend": state.backend.name,
        "model": state.model_id,
        "runs_on": placement() if placement is not None else None,
        **detection.model_dump(mode="json"),
        "samples": [s.model_dump(mode="json") for s in samples],
    }
