"""The OpenAI API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.gateway.formatting import ChatFormatter, CompletionFormatter, Formatter
from server.gateway.generation import RunningJob, collect, start_job
from server.gateway.jobs import chat_job, completion_job
from server.gateway.models.listing import pool_listing
from server.gateway.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.gateway.served_models import backend_for, served_names
from server.gateway.state import StateDep, verify_api_key
from server.gateway.streaming import JobStreamingResponse

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(verify_api_key)])

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"


async def _answer(request: Request, running: RunningJob, formatter: Formatter, stream: bool,
                  include_usage: bool) -> Response:
    if stream:
        return JobStreamingResponse(running, formatter, include_usage)
    await collect(request, running)
    return JSONResponse(formatter.response(running.choices.ordered(), running.usage))


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep) -> Response:
    """Chat completion, streamed as server-sent events when `stream` is true."""
    state.require_ready()
    backend, model_id = await backend_for(state, body.model)
    job = chat_job(body, backend, model_id, state.sampling_defaults)
    formatter = ChatFormatter(model_id, want_logprobs=body.logprobs, n=body.n)
    running = await start_job(request, state, job, CHAT_ROUTE, backend)
    return await _answer(request, running, formatter, body.stream, body.wants_usage_chunk)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Response:
    """Text completion, streamed as server-sent events when `stream` is true."""
    state.require_ready()
    backend, model_id = await backend_for(state, body.model)
    job = completion_job(body, backend, model_id, state.settings.default_completion_max_tokens,
                         state.sampling_defaults)
    formatter = CompletionFormatter(model_id, want_logprobs=body.logprobs is not None,
                                    echo_prompt=body.prompt_text() if body.echo else None, n=body.n)
    running = await start_job(request, state, job, COMPLETIONS_ROUTE, backend)
    return await _answer(request, running, formatter, body.stream, body.wants_usage_chunk)


@router.get("/models", response_model=None)
async def models(state: StateDep) -> ModelList | JSONResponse:
    """The model this gateway serves, under each name it answers to; with a models file, every model with
    its state (resident, loading, unloaded, unloading) and planned memory."""
    listing = pool_listing(state)
    if listing is not None:
        return JSONResponse(listing)
    if state.load_error is not None:
        state.require_ready()
    n_ctx = state.backend.n_ctx if state.is_ready() else None
    return ModelList(data=[ModelCard(id=name, created=state.created, max_model_len=n_ctx,
                                     sampling_defaults=state.sampling_defaults.as_dict())
                           for name in served_names(state)])
