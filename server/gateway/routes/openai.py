"""The OpenAI API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.gateway.formatting import ChatFormatter, CompletionFormatter
from server.gateway.generation import collect, start_job
from server.gateway.jobs import chat_job, completion_job
from server.gateway.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.gateway.state import StateDep, verify_api_key
from server.gateway.streaming import JobStreamingResponse

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(verify_api_key)])

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep) -> Response:
    """Chat completion, streamed as server-sent events when `stream` is true."""
    state.require_ready()
    job = chat_job(body, state.backend, state.model_id, state.sampling_defaults)
    formatter = ChatFormatter(state.model_id, want_logprobs=body.logprobs)
    running = await start_job(request, state, job, CHAT_ROUTE)
    if body.stream:
        return JobStreamingResponse(running, formatter, body.wants_usage_chunk)
    text = await collect(request, running)
    return JSONResponse(formatter.response(text, running.logprobs, running.finish_reason, running.usage))


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Response:
    """Text completion, streamed as server-sent events when `stream` is true."""
    state.require_ready()
    job = completion_job(body, state.backend, state.model_id, state.settings.default_completion_max_tokens,
                         state.sampling_defaults)
    formatter = CompletionFormatter(state.model_id, want_logprobs=body.logprobs is not None,
                                    echo_prompt=body.prompt_text() if body.echo else None)
    running = await start_job(request, state, job, COMPLETIONS_ROUTE)
    if body.stream:
        return JobStreamingResponse(running, formatter, body.wants_usage_chunk)
    text = await collect(request, running)
    return JSONResponse(formatter.response(text, running.logprobs, running.finish_reason, running.usage))


@router.get("/models")
async def models(state: StateDep) -> ModelList:
    """The one model this gateway serves (none once it failed to load)."""
    if state.load_error is not None:
        state.require_ready()
    n_ctx = state.backend.n_ctx if state.is_ready() else None
    return ModelList(data=[ModelCard(id=state.model_id, created=state.created, max_model_len=n_ctx,
                                     sampling_defaults=state.sampling_defaults.as_dict())])
