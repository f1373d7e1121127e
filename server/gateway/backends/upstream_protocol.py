"""The OpenAI wire format as remote servers speak it: request bodies out, SSE chunks and JSON answers in.

Pure functions over dicts and lines, so every server's dialect (llama-server, SGLang, llama-cpp-python's
server, edgeserve) is handled and tested in one place; the backend in openai_upstream.py does the I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from server.gateway.backends.base import BackendError, Delta, GenerationJob, TokenLogprob, ToolCallDelta
from server.gateway.backends.dialects import DIALECTS, Dialect, extra_fields
from server.gateway.backends.upstream_errors import is_error_payload, map_error, parse_json


class EmptyStreamError(BackendError):
    """The upstream answered 200 and closed the stream without a single event.

    llama-cpp-python's server reports errors of streamed requests this way; asking again without streaming
    shows the real error (or the answer).
    """

    status_code = 502
    code = "upstream_empty_stream"
    retryable = True


def request_body(job: GenerationJob, model: str, *, stream: bool = True,
                 dialect: Dialect = DIALECTS["edgeserve"]) -> dict[str, Any]:
    """The upstream request for `job`: OpenAI fields plus the extras that are set, in `dialect`."""
    p = job.params
    body: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if job.kind == "chat":
        messages = list(job.messages)
        if job.continuation:
            # llama-server and SGLang continue a trailing assistant message instead of starting a new one.
            messages.append({"role": "assistant", "content": job.continuation})
        body["messages"] = messages
    else:
        body["prompt"] = job.prompt + job.continuation
    # Without max_tokens llama-server generates until the context is full; completions always carry one.
    if job.extra.get("max_tokens_explicit", True) or job.kind == "completion":
        body["max_tokens"] = p.max_tokens
    body["temperature"] = p.temperature
    body["top_p"] = p.top_p
    if p.repeat_penalty != 1.0:
        body["repeat_penalty"] = p.repeat_penalty  # llama-server's name
        body["repetition_penalty"] = p.repeat_penalty  # SGLang's and vLLM's
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        body["frequency_penalty"] = p.frequency_penalty
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.ignore_eos:
        body["ignore_eos"] = True
    if p.logprobs is not None:
        if job.kind == "chat":
            body["logprobs"] = True
            body["top_logprobs"] = p.logprobs
        else:
            body["logprobs"] = p.logprobs
    body.update(extra_fields(job, dialect))
    return body


def chunk_logprobs(choice: dict[str, Any], kind: str) -> tuple[TokenLogprob, ...]:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return ()
    if kind == "chat":
        entries = lp.get("content") or []
        return tuple(
            TokenLogprob(token=str(e.get("token", "")), logprob=float(e.get("logprob", 0.0)),
                         token_bytes=tuple(e.get("bytes") or ()))
            for e in entries if isinstance(e, dict)
        )
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    return tuple(TokenLogprob(token=str(t), logprob=float(v or 0.0))
                 for t, v in zip(tokens, values, strict=False))


async def sse_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The lines of an SSE body, split where SSE splits them (CR, LF, CRLF) and nowhere else.

    httpx's aiter_lines splits like str.splitlines(), also at U+2028, U+0085, ... which servers leave raw
    inside JSON strings: a `data:` line would arrive cut in two.
    """
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *lines, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")


def _choice_text(choice: dict[str, Any], kind: str) -> str:
    if kind == "chat":
        delta = choice.get("delta") or choice.get("message") or {}
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")


def _tool_calls(choice: dict[str, Any]) -> tuple[ToolCallDelta, ...]:
    """OpenAI tool_calls (stream deltas or a whole message's calls) as ToolCallDeltas."""
    body = choice.get("delta") or choice.get("message") or {}
    out = []
    for i, call in enumerate(body.get("tool_calls") or ()):
        if not isinstance(call, dict):
            continue
        fn = call.get("function") or {}
        out.append(ToolCallDelta(index=int(call.get("index", i)), id=call.get("id"), name=fn.get("name"),
                                 arguments=str(fn.get("arguments") or "")))
    return tuple(out)


async def stream_deltas(lines: AsyncIterable[str], job: GenerationJob) -> AsyncIterator[Delta]:
    """Deltas from an upstream SSE stream, each with its choice's index. The finishes go out last, with the
    counts of the usage chunk (which follows the finish chunks). Errors in the stream raise mapped
    BackendErrors."""
    prompt_tokens = 0
    reported_tokens: int | None = None
    chunks_seen: dict[int, int] = {}
    finish: dict[int, str] = {}
    saw_event = saw_done = False
    pass_through = job.can_pass_through
    async for line in lines:
        if not line or line.startswith(":"):
            continue
        field, _, data = line.partition(":")
        data = data.strip()
        saw_event = True
        if field == "error":  # llama-server's own SSE error event
            raise map_error(500, parse_json(data), job.kind, text=data)
        if field != "data":
            continue
        if data == "[DONE]":
            saw_done = True
            break
        chunk = parse_json(data)
        if is_error_payload(chunk):
            inner = chunk.get("error")
            status = (inner if isinstance(inner, dict) else chunk).get("code")
            raise map_error(status if isinstance(status, int) else 500, chunk, job.kind, text=data)
        if not isinstance(chunk, dict):
            continue
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
            if usage.get("completion_tokens") is not None:
                reported_tokens = int(usage["completion_tokens"])
        choices: list[dict[str, Any]] = chunk.get("choices") or []
        # A plain content chunk under the job's model name goes on as it came (finishes and usage are the
        # gateway's own: they come last, with the counts of the usage chunk).
        raw = (data if pass_through and len(choices) == 1 and chunk.get("model") == job.model
               and not choices[0].get("finish_reason") and not usage else None)
        for choice in choices:
            index = int(choice.get("index") or 0)
            text = _choice_text(choice, job.kind)
            logprobs = chunk_logprobs(choice, job.kind)
            calls = _tool_calls(choice) if job.kind == "chat" else ()
            if text or logprobs or calls:
                # Until usage arrives, count about one token per chunk (what streaming servers send).
                chunks_seen[index] = chunks_seen.get(index, 0) + 1
                yield Delta(text=text, prompt_tokens=prompt_tokens, completion_tokens=chunks_seen[index],
                            logprobs=logprobs, index=index, tool_calls=calls, raw=raw)
            if choice.get("finish_reason"):
                finish[index] = str(choice["finish_reason"])
    if not saw_event:
        raise EmptyStreamError("the upstream closed the stream without sending anything")
    if len(finish) < job.n and not saw_done:
        raise BackendError("the upstream stream ended before the answer was complete", status_code=502,
                           code="upstream_truncated", retryable=False)
    for index in range(max(job.n, len(finish))):
        # With one choice the usage chunk's count is exact; with several it is their sum.
        tokens = reported_tokens if reported_tokens is not None and job.n == 1 else chunks_seen.get(index, 0)
        yield Delta(text="", finish_reason=finish.get(index, "stop"), prompt_tokens=prompt_tokens,
                    completion_tokens=tokens, index=index)


def answer_deltas(answer: Any, job: GenerationJob) -> list[Delta]:
    """The deltas of a non-streamed upstream answer (per choice: its text and calls, then its finish)."""
    if not isinstance(answer, dict) or not answer.get("choices"):
        raise BackendError("the upstream answer has no choices", status_code=502, code="upstream_error")
    usage = answer.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    deltas = []
    for choice in answer["choices"]:
        index = int(choice.get("index") or 0)
        text = _choice_text(choice, job.kind)
        calls = _tool_calls(choice) if job.kind == "chat" else ()
        tokens = completion_tokens if len(answer["choices"]) == 1 else 0
        if text or calls:
            deltas.append(Delta(text=text, prompt_tokens=prompt_tokens, completion_tokens=tokens, index=index,
                                tool_calls=calls))
        deltas.append(Delta(text="", finish_reason=str(choice.get("finish_reason") or "stop"),
                            prompt_tokens=prompt_tokens, completion_tokens=tokens, index=index))
    return deltas
