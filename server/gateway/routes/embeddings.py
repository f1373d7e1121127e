"""POST /v1/embeddings: one pooled, normalised vector per input, as floats or base64."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends

from server.gateway.backends.base import Embeds
from server.gateway.backends.features import EMBEDDINGS
from server.gateway.errors import invalid_request
from server.gateway.schemas import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from server.gateway.served_models import backend_for
from server.gateway.state import StateDep, verify_api_key

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(verify_api_key)])


def _encode(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return list(vector)


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, state: StateDep) -> EmbeddingResponse:
    """Embeddings of a text, a list of texts, token ids or lists of token ids."""
    state.require_ready()
    backend, model_id = await backend_for(state, body.model)
    if not isinstance(backend, Embeds) or EMBEDDINGS not in (getattr(backend, "features", None) or ()):
        raise invalid_request(f"the {backend.name} backend does not embed", param="model",
                              code="unsupported_feature")
    result = await backend.embed(body.items())
    data = [Embedding(index=i, embedding=_encode(v, body.encoding_format))
            for i, v in enumerate(result.vectors)]
    return EmbeddingResponse(data=data, model=model_id,
                             usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens,
                                                  total_tokens=result.prompt_tokens))
