"""The OpenAI wire format as remote servers speak it: request bodies out, SSE chunks and JSON answers in.

Pure functions over dicts and lines, so every server's dialect (llama-server, SGLang, llama-cpp-python's
server, edgeserve) is handled and tested in one place; the backend in openai_upstream.py does the I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from server.gateway.backends.base import BackendError, Delta, GenerationJob, TokenLogprob
from server.gateway.backends.upstream_errors import is_error_payload, map_error, parse_json


class EmptyStreamError(BackendError):
    """The upstream answered 200 and closed the stream without a single event.

    llama-cpp-python's server reports errors of streamed requests this way; asking again without streaming
    shows the real error (or the answer).
    """

    status_code = 502
    code = "upstream_empty_stream"
    retryable = True


def request_body(job: GenerationJob, model: str, *, stream: bool = True) -> dict[str, Any]:
    """The upstream request for `job`: OpenAI fields plus the llama.cpp / SGLang extras that are set."""
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
    if p.top_k:
        body["top_k"] = p.top_k
    if p.min_p:
        body["min_p"] = p.min_p
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


async def stream_deltas(lines: AsyncIterable[str], job: GenerationJob) -> AsyncIterator[Delta]:
    """Deltas from an upstream SSE stream. The finish goes out last, with the counts of the usage chunk
    (which follows the finish chunk). Errors in the stream raise mapped BackendErrors."""
    prompt_tokens = 0
    reported_tokens: int | None = None
    chunks_seen = 0
    finish_reason: str | None = None
    saw_event = saw_done = False
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
        for choice in chunk.get("choices") or ():
            text = _choice_text(choice, job.kind)
            logprobs = chunk_logprobs(choice, job.kind)
            if text or logprobs:
                # Until usage arrives, count about one token per chunk (what streaming servers send).
                chunks_seen += 1
                yield Delta(text=text, prompt_tokens=prompt_tokens, completion_tokens=chunks_seen,
                            logprobs=logprobs)
            if choice.get("finish_reason"):
                finish_reason = str(choice["finish_reason"])
    if not saw_event:
        raise EmptyStreamError("the upstream closed the stream without sending anything")
    if finish_reason is None and not saw_done:
        raise BackendError("the upstream stream ended before the answer was complete", status_code=502,
                           code="upstream_truncated", retryable=False)
    yield Delta(text="", finish_reason=finish_reason or "stop", prompt_tokens=prompt_tokens,
                completion_tokens=reported_tokens if reported_tokens is not None else chunks_seen)


def answer_deltas(answer: Any, job: GenerationJob) -> list[Delta]:
    """The deltas of a non-streamed upstream answer (one text delta and the finish)."""
    if not isinstance(answer, dict) or not answer.get("choices"):
        raise BackendError("the upstream answer has no choices", status_code=502, code="upstream_error")
    choice = answer["choices"][0]
    usage = answer.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    text = _choice_text(choice, job.kind)
    deltas = []
    if text:
        deltas.append(Delta(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
    deltas.append(Delta(text="", finish_reason=str(choice.get("finish_reason") or "stop"),
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
    return deltas
