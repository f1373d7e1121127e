"""Server-sent events: `data: {json}` per chunk, `data: [DONE]` at the end, errors as an `error` payload.

The body generator owns the running job: however it ends (done, error, client gone, timeout), its `finally`
closes the backend stream, which cancels the sequence and frees its KV, and releases the admission slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.gateway.backends.base import BackendError, Delta
from server.gateway.errors import error_body, error_type_for
from server.gateway.formatting import Formatter
from server.gateway.generation import RequestTimeoutError, RunningJob, ServerEndingError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Characters JSON may carry raw that Python's str.splitlines() (httpx's aiter_lines, and with it many
# clients) treats as line ends, splitting a `data:` line in the middle of a JSON string. json.dumps already
# escapes the C0 controls (\v, \f, \x1c-\x1e); these three it leaves raw with ensure_ascii=False.
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKERS)
    return b"data: " + text.encode() + b"\n\n"


def sse_text(data: str) -> bytes:
    """An upstream chunk's JSON text as it came, made safe for line-splitting clients like our own."""
    return b"data: " + data.translate(_LINE_BREAKERS).encode() + b"\n\n"


def _event(formatter: Formatter, delta: Delta) -> bytes | None:
    if delta.raw is not None:
        return sse_text(delta.raw)
    if delta.text or delta.finish_reason is not None or delta.logprobs or delta.tool_calls:
        return sse(formatter.chunk(delta))
    return None


async def _events(running: RunningJob, formatter: Formatter,
                  include_usage: bool) -> AsyncGenerator[bytes, None]:
    """The response body. Deltas that arrived while the last write was under way go out in one write."""
    completed = False
    try:
        if running.first.raw is not None:
            formatter.adopt(running.first.raw)
        parts = [sse(payload) for payload in formatter.opening_chunks()]
        deltas = [running.first]
        while True:
            for delta in deltas:
                event = _event(formatter, delta)
                if event is not None:
                    parts.append(event)
            if running.finish_reason is not None:
                break
            if parts:
                yield b"".join(parts)
                parts = []
            first = await running.next_delta()
            if first is None:
                # The backend ended without a reason: close the choice properly anyway.
                parts.append(sse(formatter.chunk(Delta(text="", finish_reason="stop"))))
                break
            deltas = [first, *running.ready_deltas()]
            for delta in deltas:
                running.record(delta)
        if include_usage:
            parts.append(sse(formatter.usage_chunk(running.usage)))
        completed = True
        parts.append(DONE)
        yield b"".join(parts)
    except BackendError as exc:
        log.warning("backend failed mid-stream: %s", exc.message)
        running.is_answered = True
        yield sse(error_body(exc.message, error_type_for(exc.status_code), exc.param, exc.code))
        yield DONE
    except RequestTimeoutError:
        timeout_s = running.state.settings.request_timeout_s
        running.is_answered = True
        message = f"request did not finish within {timeout_s:g} s"
        yield sse(error_body(message, "timeout_error", None, "timeout"))
        yield DONE
    except ServerEndingError:
        # The shutdown grace period is over: the stream ends with a reason and [DONE], not a cut connection.
        running.is_answered = True
        message = "the server is shutting down; the answer so far is all there will be (retry for the rest)"
        yield sse(error_body(message, "server_error", None, "server_shutting_down"))
        yield DONE
    finally:
        # Shielded: when the client is gone Starlette cancels this task's scope, and every await in here would
        # be cancelled again before the backend stream (and its sequence) was closed.
        await asyncio.shield(running.close(completed=completed))


class JobStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its job however the response ends, even when it never started."""

    def __init__(self, running: RunningJob, formatter: Formatter, include_usage: bool) -> None:
        self._running = running
        self._events: AsyncGenerator[bytes, None] = _events(running, formatter, include_usage)
        super().__init__(self._events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette may stop iterating without closing the generator (client gone): close it now, so the
            # backend sequence is cancelled within one engine step, not whenever the generator is collected.
            await asyncio.shield(self._cleanup())

    async def _cleanup(self) -> None:
        try:
            await self._events.aclose()
        except Exception:
            log.debug("closing the event stream failed", exc_info=True)
        if not (self._running.is_completed or self._running.is_answered):
            self._running.state.metrics.cancelled.inc()
        await self._running.close(completed=False)
