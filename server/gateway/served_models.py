"""The model names a gateway answers to; a request for another name gets 404 model_not_found.

The names are the `served_model_names` setting, else the model's own id and the alias "edgeserve" (the
README's examples send it, and many clients send one fixed name).
"""

from __future__ import annotations

from server.gateway.backends.base import Backend, BackendError
from server.gateway.errors import APIError, from_backend_error
from server.gateway.models.pool import ModelPool
from server.gateway.settings import DEFAULT_ALIAS
from server.gateway.state import GatewayState


def served_names(state: GatewayState) -> list[str]:
    configured = state.settings.served_model_names
    if configured:
        return list(configured)
    return list(dict.fromkeys([state.model_id, DEFAULT_ALIAS]))


def check_model(state: GatewayState, name: str) -> None:
    """404 model_not_found, as OpenAI answers, for a model this gateway does not serve."""
    names = served_names(state)
    if name not in names:
        raise APIError(404, f"the model {name!r} does not exist here; this server serves "
                       f"{', '.join(repr(n) for n in names)}", type="invalid_request_error", param="model",
                       code="model_not_found")


async def backend_for(state: GatewayState, name: str) -> tuple[Backend, str]:
    """The backend a request for `name` runs on and the model id its answer carries. With a models file the
    pool makes the model resident first (404 for a name it does not serve, 503 + Retry-After when it cannot
    load now)."""
    pool = state.backend
    if not isinstance(pool, ModelPool):
        check_model(state, name)
        return state.backend, state.model_id
    try:
        routed = await pool.route(name)
    except BackendError as exc:
        raise from_backend_error(exc, state.settings.retry_after_s) from None
    return routed, routed.model_id
