"""Chat messages: roles, text content, tool calls and tool results, as the chat templates get them."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import field_validator, model_validator

from server.gateway.schemas.base import Request
from server.gateway.schemas.tools import ToolCall

# Content parts OpenAI defines that a text-only model cannot take, with what the client is told.
UNSUPPORTED_PARTS = {
    "image_url": "image input is not supported by this model",
    "input_image": "image input is not supported by this model",
    "input_audio": "audio input is not supported by this model",
    "file": "file input is not supported by this model",
}


class TextPart(Request):
    type: Literal["text"]
    text: str


class RefusalPart(Request):
    type: Literal["refusal"]
    refusal: str


def _check_parts(value: Any) -> Any:
    """Name the part a text-only model cannot take, instead of pydantic's list of union members."""
    if not isinstance(value, list):
        if value is not None and not isinstance(value, str):
            raise ValueError("content must be a string, a list of content parts or null")
        return value
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in UNSUPPORTED_PARTS:
            raise ValueError(f"part {i}: {UNSUPPORTED_PARTS[kind]}")
        if kind not in ("text", "refusal"):
            raise ValueError(f"part {i}: content parts are objects of type text; got {kind!r}")
    return value


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> Any:
        return _check_parts(value)

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in self.content)

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates (and OpenAI-compatible servers) take it: text content, OpenAI's
        "developer" as "system", tool calls with their arguments as sent."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def arguments_object(arguments: str) -> Any:
    """A tool call's arguments string as JSON (templates that render calls want an object), or the string."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
