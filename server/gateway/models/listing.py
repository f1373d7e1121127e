"""GET /v1/models with a models file: every model under each name it answers to, with its state and the memory
its plan says it holds (OpenAI's model object, with edgeserve's fields beside the standard ones)."""

from __future__ import annotations

from typing import Any

from quantize.model.units import MIB
from server.gateway.models.pool import ModelPool
from server.gateway.state import GatewayState


def pool_listing(state: GatewayState) -> dict[str, Any] | None:
    """The /v1/models body for a pool; None for a gateway of one model."""
    pool = state.backend
    if not isinstance(pool, ModelPool):
        return None
    data = []
    for member in pool.members.values():
        n_ctx = member.backend.n_ctx if member.is_resident and member.backend is not None else None
        for name in member.entry.names:
            data.append({
                "id": name, "object": "model", "created": state.created, "owned_by": "edgeserve",
                "root": member.name, "max_model_len": n_ctx, "backend": member.entry.backend,
                "state": member.state, "planned_memory_mib": round(member.planned_bytes / MIB, 1),
                "pinned": member.entry.policy.pinned, "in_flight": member.in_flight,
                "loads": member.loads,
            })
    return {"object": "list", "data": data,
            "budget_mib": round(pool.budget_bytes / MIB, 1),
            "resident_planned_mib": round(sum(m.planned_bytes for m in pool.members.values()
                                              if m.holds_memory) / MIB, 1)}
