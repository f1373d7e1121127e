"""Errors of remote OpenAI-compatible servers (llama-server, SGLang, another edgeserve) in edgeserve's terms.

Shapes seen in the wild:
- OpenAI and edgeserve: {"error": {"message", "type", "param", "code"}}.
- llama-server: {"error": {"code": 400, "message": "request (N tokens) exceeds the available context size
  (M tokens)...", "type": "exceed_context_size_error", "n_prompt_tokens": N, "n_ctx": M}}.
- SGLang (and vLLM): flat {"object": "error", "message", "type", "param", "code": 400}.
"""

from __future__ import annotations

import json
import re
from typing import Any

from server.gateway.backends.base import (
    BackendError,
    BackendUnavailableError,
    ContextLengthExceededError,
    JobKind,
)

LLAMA_SERVER_CONTEXT_TYPE = "exceed_context_size_error"
OPENAI_CONTEXT_CODE = "context_length_exceeded"
# SGLang and vLLM only say it in words; these cover their messages ("... longer than the model's context
# length", "Requested token count exceeds the model's maximum context length", "maximum context length is")
_CONTEXT_WORDS = re.compile(
    r"context length|context size|context window|maximum context|exceeds? the (?:available )?context",
    re.IGNORECASE,
)


def _error_fields(payload: Any) -> dict[str, Any] | None:
    """The error object of a response body or stream chunk, whatever its shape; None if it is not an error."""
    if not isinstance(payload, dict):
        return None
    inner = payload.get("error")
    if isinstance(inner, dict):
        return inner
    if isinstance(inner, str):
        return {"message": inner}
    if payload.get("object") == "error" or ("message" in payload and "choices" not in payload):
        return payload
    return None


def is_error_payload(payload: Any) -> bool:
    return _error_fields(payload) is not None


def map_error(status_code: int, payload: Any, kind: JobKind, *, text: str = "") -> BackendError:
    """One upstream failure as a BackendError the gateway answers in the OpenAI shape."""
    fields = _error_fields(payload) or {}
    message = str(fields.get("message") or text or f"upstream answered HTTP {status_code}").strip()
    err_type = str(fields.get("type") or "")
    code = fields.get("code")
    code_text = code if isinstance(code, str) else None
    param = "messages" if kind == "chat" else "prompt"

    if (err_type == LLAMA_SERVER_CONTEXT_TYPE or code_text == OPENAI_CONTEXT_CODE
            or (status_code in (400, 413, 422) and _CONTEXT_WORDS.search(message))):
        return ContextLengthExceededError(message, param=param)
    if status_code in (502, 503, 504):
        return BackendUnavailableError(f"upstream unavailable (HTTP {status_code}): {message}")
    if status_code == 429:
        return BackendError(f"upstream is busy: {message}", status_code=429, code="upstream_busy",
                            retryable=True)
    if status_code in (401, 403):
        # The client's key is ours to check; the upstream refusing us is a gateway configuration problem.
        return BackendError(f"upstream refused the gateway's credentials: {message}", status_code=502,
                            code="upstream_auth_failed", retryable=False)
    if 400 <= status_code < 500:
        raw_param = fields.get("param")
        return BackendError(message, status_code=400, code=code_text or "invalid_request_error",
                            param=str(raw_param) if raw_param else None, retryable=False)
    return BackendError(f"upstream failed (HTTP {status_code}): {message}", status_code=502,
                        code=code_text or "upstream_error", retryable=True)


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
