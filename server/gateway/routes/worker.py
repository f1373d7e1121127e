"""What a model gateway in front of several replicas asks of each one, answered in SGLang's shapes.

SGLang's model gateway (the `sglang-router` package) registers an HTTP worker by reading /server_info and
/model_info (falling back to /get_server_info and /get_model_info), names the worker's model after
`served_model_name`, polls a health path (edgeserve's /ready) and, for its power_of_two policy, the load
(/get_load; newer releases read /v1/loads). Like /health and /ready these need no API key: they say nothing
a probe should not see.

`model_path` and `tokenizer_path` are left out on purpose: given either, the router loads a tokenizer from
it, from a model hub when it is not a local folder. It needs none to route HTTP workers, and edgeserve
tokenizes itself.
"""

from __future__ import annotations

import importlib.metadata

from fastapi import APIRouter

from server.gateway.backends.base import BackendStats, ReportsStats
from server.gateway.state import GatewayState, StateDep
from server.gateway.worker_load import WorkerLoad, worker_load

router = APIRouter(tags=["worker"])


def _version() -> str:
    try:
        return importlib.metadata.version("edgeserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load(state: GatewayState) -> WorkerLoad:
    backend = state.backend
    stats = backend.stats() if isinstance(backend, ReportsStats) and state.is_loaded else BackendStats()
    return worker_load(state.admission.snapshot(), stats, backend.n_ctx if state.is_loaded else 0)


@router.get("/server_info")
@router.get("/get_server_info", include_in_schema=False)
async def server_info(state: StateDep) -> dict[str, object]:
    """The served model's id and this replica's capacity, under SGLang's server_info keys."""
    load = _load(state)
    return {
        "served_model_name": state.model_id,
        "backend": state.backend.name,
        "dp_size": 1,
        "context_length": state.backend.n_ctx if state.is_loaded else None,
        "max_running_requests": load.max_running,
        "max_total_num_tokens": load.max_total_tokens,
        "max_queued_requests": state.admission.max_queue,
        "is_ready": state.is_ready(),
        "version": _version(),
        "frontend": "edgeserve",
    }


@router.get("/model_info")
@router.get("/get_model_info", include_in_schema=False)
async def model_info(state: StateDep) -> dict[str, object]:
    """The model this replica serves, under SGLang's model_info keys."""
    return {"served_model_name": state.model_id, "is_generation": True}


@router.get("/get_load")
async def get_load(state: StateDep) -> list[dict[str, int]]:
    """Requests running and waiting, and the load in tokens (server.gateway.worker_load)."""
    return _load(state).as_get_load()


@router.get("/v1/loads")
async def loads(state: StateDep) -> dict[str, object]:
    """The same load in SGLang's newer /v1/loads shape."""
    return _load(state).as_v1_loads()
