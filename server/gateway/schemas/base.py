"""What every request and response model shares: strict request validation, text that can be encoded, and
fields that are refused on purpose.

Requests are strict (a string is not a number, `true` is not 1; an int is fine where a float is asked for)
and closed: a field edgeserve does not know is a 400 that names it rather than something silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator


def unencodable_at(value: Any, path: str = "") -> str | None:
    """Where in `value` (a path such as ".properties.x" or "[2]") a string sits that UTF-8 cannot encode (a
    lone surrogate such as "\\ud800", which JSON allows); None when everything encodes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "."
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = unencodable_at(key, f"{path}.<key>") or unencodable_at(item, f"{path}.{key}")
            if where is not None:
                return where
        return None
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        for i, item in enumerate(value):
            where = unencodable_at(item, f"{path}[{i}]")
            if where is not None:
                return where
    return None


class Request(BaseModel):
    """A request body or a part of one: strict, closed, and only text that UTF-8 can carry."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _encodable(cls, value: Any, info: ValidationInfo) -> Any:
        # Nested models checked their own fields already; plain values (str, dict, list) are walked here.
        if isinstance(value, BaseModel):
            return value
        where = unencodable_at(value)
        if where is not None:
            inside = "" if where == "." else f" (at {where.replace('.<key>', ' a key')})"
            raise ValueError(f"text that is not valid Unicode{inside}: a lone surrogate such as \\ud800 "
                             "cannot be encoded; send valid UTF-8")
        return value


class Wire(BaseModel):
    """A response shape."""

    model_config = ConfigDict(frozen=True)


def refused(reason: str) -> AfterValidator:
    """For a field OpenAI defines that edgeserve does not implement (`Annotated[Any, refused(...)]`): any
    value but null is a 400 with `reason`."""

    def check(value: Any) -> Any:
        if value is not None:
            raise ValueError(reason)
        return value

    return AfterValidator(check)


def only(value: object, reason: str) -> AfterValidator:
    """For an extension field that edgeserve takes at one value, the one its behaviour has (what SGLang's
    router writes into every request it forwards): any other value is a 400 with `reason`."""

    def check(given: Any) -> Any:
        if given != value:
            raise ValueError(reason)
        return given

    return AfterValidator(check)
