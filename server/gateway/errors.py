"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} for every failure we answer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.gateway.backends.base import BackendError

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_type_for(status_code: int) -> str:
    """The OpenAI `type` that goes with an HTTP status."""
    return _TYPE_BY_STATUS.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")


class APIError(Exception):
    """An error the gateway answers itself, already in OpenAI terms."""

    def __init__(self, status_code: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or error_type_for(status_code)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    # A message may quote the client's own text: escape what would make the answer itself unencodable.
    return {"error": {"message": printable(message), "type": type,
                      "param": printable(param) if param is not None else None, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, type="invalid_request_error", param=param, code=code)


def from_backend_error(exc: BackendError, retry_after_s: int) -> APIError:
    """Map a backend failure to the error the client sees (503 and 429 tell it when to retry)."""
    headers = {"Retry-After": str(retry_after_s)} if exc.status_code in (429, 503) else {}
    return APIError(exc.status_code, exc.message, param=exc.param, code=exc.code, headers=headers)


def _json(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers or None)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    if not parts:
        return None
    # "messages.0.content" reads like OpenAI's own `param` values.
    return ".".join(parts)


def printable(text: str) -> str:
    """`text` as it can go into a JSON answer: what UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(error: Mapping[str, Any]) -> tuple[str, str | None]:
    """A message a person can read, and the `param`, for one pydantic error."""
    kind = error.get("type")
    loc = tuple(error.get("loc", ()))
    if kind == "json_invalid":
        # loc is ("body", position): the position goes into the message, not into param.
        position = loc[-1] if loc and isinstance(loc[-1], int) else None
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        where = f" at character {position}" if position is not None else ""
        return f"the request body is not valid JSON: {reason}{where}", None
    param = _param_from_loc(loc)
    if kind == "model_attributes_type" and param is None:
        return "the request body must be a JSON object", None
    if kind == "extra_forbidden":
        return (f"unknown field {param!r}: edgeserve does not implement it (the README's API section lists "
                "what is supported)"), param
    if kind == "missing":
        return f"{param} is required", param
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _json(exc)


async def _backend_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BackendError)
    # The gateway's state holds the settings; an app without it (no lifespan yet) answers with the default.
    state = getattr(request.app.state, "gateway", None)
    retry_after_s = state.settings.retry_after_s if state is not None else 1
    return _json(from_backend_error(exc, retry_after_s))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return _json(invalid_request("invalid request"))
    message, param = _describe(errors[0])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return _json(invalid_request(message, param=param))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = str(exc.detail)
    if detail == "There was an error parsing the body":  # FastAPI's words for a body it cannot decode
        detail = "the request body could not be read: send JSON in UTF-8"
    api = APIError(exc.status_code, detail, headers=exc.headers)
    return _json(api)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _json(APIError(500, "internal server error", code="internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    """Make every error leave the gateway in the OpenAI shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(BackendError, _backend_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
