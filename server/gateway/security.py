"""Request hygiene at the edge: a body size limit (413) and access to /metrics.

The API key itself is checked by `state.verify_api_key` on the /v1 routers (constant-time compare); /health
and /ready stay open so orchestrators can probe without a key; /metrics needs the key only when
`metrics_require_api_key` is set (Prometheus scrapers are often inside the trusted network).
"""

from __future__ import annotations

import json

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.gateway.errors import error_body
from server.gateway.state import StateDep, verify_api_key

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


async def verify_metrics_access(request: Request, state: StateDep) -> None:
    """Dependency of /metrics: the API key applies only when the settings say so."""
    if state.settings.metrics_require_api_key:
        await verify_api_key(request, state)


class BodySizeLimitMiddleware:
    """Refuse request bodies over `max_body_bytes` with 413 in the OpenAI error shape.

    A declared Content-Length over the limit is refused before a byte is read. A chunked body is read up to
    the limit and refused as soon as it passes it, so a client cannot make the gateway buffer more than that.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send, declared)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away while sending: let the app see the disconnect.
                await self.app(scope, _replay(bytes(body), receive, first=message), send)
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_body_bytes:
                await self._refuse(send, None)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, send: Send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else "more than that"
        payload = error_body(f"request body too large: the limit is {self.max_body_bytes} bytes, got {size}",
                             "invalid_request_error", None, "request_too_large")
        raw = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": raw})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive, first: Message | None = None) -> Receive:
    """A receive() that hands over the buffered body once, then the connection's own messages (disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent, first
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if first is not None:
            message, first = first, None
            return message
        return await receive()

    return replayed
