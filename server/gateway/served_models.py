"""The model names a gateway answers to; a request for another name gets 404 model_not_found.

The names are the `served_model_names` setting, else the model's own id and the alias "edgeserve" (the
README's examples send it, and many clients send one fixed name).
"""

from __future__ import annotations

from server.gateway.errors import APIError
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
