"""From an OpenAI request to a GenerationJob: sampling settings, token budget and the context-window check."""

from __future__ import annotations

import dataclasses

from server.engine.types import SamplingParams
from server.gateway.backends.base import Backend, GenerationJob, JobKind, supported_features
from server.gateway.errors import APIError, invalid_request
from server.gateway.sampling_defaults import SamplingDefaults
from server.gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.gateway.structured_output import constraint_of
from server.gateway.tool_prompt import tool_spec_of

# In GenerationJob.extra: False when the client gave no max_tokens (a remote server then applies its default).
MAX_TOKENS_EXPLICIT = "max_tokens_explicit"
UNKNOWN_CTX_MAX_TOKENS = 4096


def _sampling(req: SamplingFields, max_tokens: int, logprobs: int | None,
              defaults: SamplingDefaults) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            top_k=defaults.top_k if req.top_k is None else max(0, req.top_k),
            min_p=defaults.min_p if req.min_p is None else req.min_p,
            repeat_penalty=1.0 if req.repeat_penalty is None else req.repeat_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            stop=req.stop_tuple(),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            logit_bias=req.logit_bias_pairs(),
            speculative=req.speculative,
        )
    except ValueError as exc:
        raise invalid_request(str(exc)) from exc


def context_length_error(kind: JobKind, n_ctx: int, prompt_tokens: int, max_tokens: int | None) -> APIError:
    """OpenAI's own wording and code for a request that cannot fit the context window."""
    what = "messages" if kind == "chat" else "prompt"
    if max_tokens is None:
        detail = (f"However, your {what} resulted in {prompt_tokens} tokens. "
                  f"Please reduce the length of the {what}.")
    else:
        detail = (f"However, you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                  f"{what}, {max_tokens} in the completion). "
                  f"Please reduce the length of the {what} or completion.")
    return APIError(400, f"This model's maximum context length is {n_ctx} tokens. {detail}",
                    type="invalid_request_error", param=what, code="context_length_exceeded")


# Where each feature shows in a request, for the error that names it.
_FEATURE_PARAMS = {"grammar": "grammar", "json_schema": "response_format", "tools": "tools", "n": "n",
                   "logit_bias": "logit_bias", "token_prompt": "prompt"}


def check_features(job: GenerationJob, backend: Backend) -> None:
    """Refuse, before anything is sent, what this backend cannot do (rather than have it ignored)."""
    missing = sorted(job.features - supported_features(backend))
    if missing:
        raise invalid_request(
            f"the {backend.name} backend does not support {', '.join(missing)}; this request needs it",
            param=_FEATURE_PARAMS.get(missing[0]), code="unsupported_feature")


def _budget(job: GenerationJob, backend: Backend, requested: int | None,
            default: int | None) -> GenerationJob:
    """Fix max_tokens against the context window; refuse what cannot fit before it takes a slot."""
    check_features(job, backend)
    n_ctx = backend.n_ctx
    prompt_tokens = backend.count_prompt_tokens(job)
    if prompt_tokens is not None:
        if prompt_tokens >= n_ctx:
            raise context_length_error(job.kind, n_ctx, prompt_tokens, None)
        if requested is not None and prompt_tokens + requested > n_ctx:
            raise context_length_error(job.kind, n_ctx, prompt_tokens, requested)
        room = n_ctx - prompt_tokens
        max_tokens = requested if requested is not None else min(default or room, room)
    else:
        # The backend cannot count before sending: a remote server applies its own limit when none was asked
        # for (MAX_TOKENS_EXPLICIT below), so this only has to be a valid placeholder.
        max_tokens = requested if requested is not None else (default or n_ctx or UNKNOWN_CTX_MAX_TOKENS)
    params = dataclasses.replace(job.params, max_tokens=max_tokens)
    extra = {**job.extra, MAX_TOKENS_EXPLICIT: requested is not None}
    return dataclasses.replace(job, params=params, extra=extra)


def chat_job(req: ChatCompletionRequest, backend: Backend, model: str,
             defaults: SamplingDefaults) -> GenerationJob:
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise invalid_request("top_logprobs needs logprobs=true", param="top_logprobs")
    tools = tool_spec_of(req)
    constraint = constraint_of(req)
    if constraint is not None and tools is not None and tools.mode in ("required", "named"):
        raise invalid_request("a forced tool call cannot be combined with response_format or a grammar",
                              param="tool_choice")
    job = GenerationJob(
        kind="chat",
        params=_sampling(req, 1, logprobs, defaults),
        model=model,
        messages=tuple(m.as_template_dict() for m in req.messages),
        n=req.n,
        constraint=constraint,
        tools=tools,
    )
    return _budget(job, backend, req.effective_max_tokens, None)


def completion_job(req: CompletionRequest, backend: Backend, model: str,
                   default_max_tokens: int, defaults: SamplingDefaults) -> GenerationJob:
    if req.echo and req.logprobs is not None:
        raise invalid_request("echo together with logprobs is not supported", param="echo")
    tokens = req.prompt_tokens()
    if req.echo and tokens is not None:
        raise invalid_request("echo needs a text prompt", param="echo")
    job = GenerationJob(
        kind="completion",
        params=_sampling(req, 1, req.logprobs, defaults),
        model=model,
        prompt=req.prompt_text(),
        n=req.n,
        constraint=constraint_of(req),
        prompt_tokens=tokens,
    )
    return _budget(job, backend, req.max_tokens, default_max_tokens)
