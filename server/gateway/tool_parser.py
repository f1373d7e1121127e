"""Tool calls out of generated text, in the generic prompt's JSON or the common native forms.

The generic prompt's JSON is {"name", "arguments"} or a list of them; the native forms are Hermes / Qwen
`<tool_call>...</tool_call>`, Mistral `[TOOL_CALLS]` and Llama 3's `{"name", "parameters"}`. Either becomes
OpenAI tool calls with `call_...` ids.

`ToolCallStream` does it on a stream: text that may still become a call is held back; at the end the held
text comes out as tool-call deltas (id and name first, then the arguments) or, when it was no call after
all, as content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from server.gateway.backends.base import Delta, TokenLogprob, ToolCallDelta
from server.gateway.backends.features import ToolSpec

CALL_OPENERS = ("{", "[", "<tool_call>", "[TOOL_CALLS]", "```")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _json_values(text: str) -> list[Any] | None:
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    if text.startswith("[TOOL_CALLS]"):
        text = text.removeprefix("[TOOL_CALLS]").strip()
    if text.startswith("<tool_call>"):
        try:
            return [json.loads(block) for block in _TAGGED.findall(text)]
        except ValueError:
            return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) else [value]


def parse_calls(text: str, names: Iterable[str]) -> list[ParsedCall] | None:
    """The calls `text` consists of, or None when it is not (only) calls of the offered functions."""
    values = _json_values(text)
    known = set(names)
    if not values:
        return None
    calls = []
    for value in values:
        if not isinstance(value, dict) or value.get("name") not in known:
            return None
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            try:
                json.loads(args)
            except ValueError:
                return None
        else:
            args = json.dumps(args, ensure_ascii=False)
        calls.append(ParsedCall(name=str(value["name"]), arguments=args))
    return calls


def may_be_call(text: str) -> bool:
    """Whether text seen so far could still turn out to be a tool call."""
    head = text.lstrip()
    return not head or any(head.startswith(o) or o.startswith(head) for o in CALL_OPENERS)


def call_deltas(calls: list[ParsedCall]) -> tuple[ToolCallDelta, ...]:
    """Each call as OpenAI streams it: id, type and name with empty arguments, then the arguments."""
    out: list[ToolCallDelta] = []
    for i, call in enumerate(calls):
        out.append(ToolCallDelta(index=i, id=call.id, name=call.name, arguments=""))
        out.append(ToolCallDelta(index=i, arguments=call.arguments))
    return tuple(out)


class ToolCallStream:
    """Per choice: passes content through, holds back what may be a call, turns calls into tool_calls."""

    def __init__(self, spec: ToolSpec) -> None:
        self._spec = spec
        self._always_call = spec.mode in ("required", "named")
        self._held = ""
        self._held_logprobs: list[TokenLogprob] = []
        self._holding = True

    def feed(self, delta: Delta) -> Delta:
        if not self._holding:
            return delta
        self._held += delta.text
        self._held_logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            return self._finish(delta)
        if self._always_call or may_be_call(self._held):
            return replace(delta, text="", logprobs=())  # counts go on; the text waits
        self._holding = False
        return self._release(delta)

    def _release(self, delta: Delta) -> Delta:
        text, logprobs = self._held, tuple(self._held_logprobs)
        self._held, self._held_logprobs = "", []
        return replace(delta, text=text, logprobs=logprobs)

    def _finish(self, delta: Delta) -> Delta:
        calls = parse_calls(self._held, self._spec.names)
        if calls and (self._spec.parallel or len(calls) == 1):
            self._held, self._held_logprobs = "", []
            reason = "tool_calls" if delta.finish_reason == "stop" else delta.finish_reason
            return replace(delta, text="", logprobs=(), tool_calls=call_deltas(calls), finish_reason=reason)
        return self._release(delta)


def with_tool_calls(spec: ToolSpec | None) -> dict[int, ToolCallStream] | None:
    """One ToolCallStream per choice, made on first use; None when the job offers no tools to call."""
    return {} if spec is not None and spec.mode != "none" else None


def route(streams: dict[int, ToolCallStream] | None, spec: ToolSpec | None, delta: Delta) -> Delta:
    """`delta` through its choice's ToolCallStream (when the job has tools)."""
    if streams is None or spec is None:
        return delta
    stream = streams.get(delta.index)
    if stream is None:
        stream = streams[delta.index] = ToolCallStream(spec)
    return stream.feed(delta)
