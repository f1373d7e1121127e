"""Tools into the prompt: the request's tools, the prompt that shows them, the grammar of a forced call.

The request's tools become a ToolSpec; the embedded engine renders them with the model's own template where it
renders tools, else with edgeserve's generic tool prompt; the grammar makes a required or named call well
formed on any model.

The generic prompt (templates/tool_prompt.jinja) lists each function with the JSON schema of its arguments
and asks for a call as a JSON object {"name": ..., "arguments": {...}} (or a list of them); earlier calls in
the history are written the same way and tool results come back as user messages, so any chat template can
render the conversation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

import jinja2

from server.engine.chat_template import ChatTemplate
from server.gateway.backends.features import ToolSpec
from server.gateway.errors import invalid_request
from server.gateway.schemas import ChatCompletionRequest, arguments_object
from server.gateway.structured_output import check_schema, schema_grammar

ANY_OBJECT = {"type": "object"}


def tool_spec_of(req: ChatCompletionRequest) -> ToolSpec | None:
    """The request's tools and tool choice (parameter schemas checked), or None when it offers none."""
    if not req.tools:
        return None
    for i, tool in enumerate(req.tools):
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools.{i}.function.parameters",
                         strict=bool(tool.function.strict))
    tools = tuple(t.model_dump(exclude_none=True) for t in req.tools)
    choice = req.tool_choice
    parallel = req.parallel_tool_calls is not False
    raw = choice if isinstance(choice, str) or choice is None else choice.model_dump()
    if choice is None or isinstance(choice, str):
        mode = choice or "auto"
        return ToolSpec(tools=tools, mode=mode, parallel=parallel, choice=raw)  # type: ignore[arg-type]
    return ToolSpec(tools=tools, mode="named", function=choice.function.name, parallel=parallel, choice=raw)


def call_schema(spec: ToolSpec) -> dict[str, Any]:
    """The JSON schema of what a required or named call may be: {"name", "arguments"} (or a list)."""
    calls = [
        {"type": "object", "required": ["name", "arguments"],
         "properties": {"name": {"const": t["function"]["name"]},
                        "arguments": t["function"].get("parameters") or ANY_OBJECT}}
        for t in spec.tools if spec.mode != "named" or t["function"]["name"] == spec.function
    ]
    one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if not spec.parallel:
        return one
    return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}


def call_grammar(spec: ToolSpec) -> str | None:
    """GBNF that forces a well-formed call, for tool_choice required or named; None otherwise."""
    if spec.mode not in ("required", "named"):
        return None
    return schema_grammar(call_schema(spec), "tools")


@cache
def _generic_template() -> jinja2.Template:
    source = resources.files("server.gateway").joinpath("templates/tool_prompt.jinja").read_text("utf-8")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env.from_string(source)


def generic_tool_prompt(spec: ToolSpec) -> str:
    return _generic_template().render(tools=spec.tools, mode=spec.mode, function=spec.function,
                                      parallel=spec.parallel).strip()


def _calls_text(calls: Sequence[Mapping[str, Any]]) -> str:
    written = [{"name": c["function"]["name"], "arguments": arguments_object(c["function"]["arguments"])}
               for c in calls]
    return json.dumps(written[0] if len(written) == 1 else written, ensure_ascii=False)


def _generic_history(messages: Sequence[Mapping[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The conversation with tool calls written as the generic prompt's JSON and tool results as user
    messages (consecutive messages of one role merged, for templates that insist on alternation)."""
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = "\n".join(x for x in (content, _calls_text(m["tool_calls"])) if x)
        elif role == "tool":
            call = m.get("tool_call_id", "")
            role, content = "user", f"Result of {names.get(call, 'the call')} ({call}):\n{content}"
        if out and out[-1]["role"] == role and role != "system":
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    if system:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{system}"
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _native_history(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as tool-aware templates (transformers' convention) want them: arguments as objects."""
    out = []
    for m in messages:
        item = dict(m)
        if m.get("tool_calls"):
            item["tool_calls"] = [
                {**c, "function": {**c["function"],
                                   "arguments": arguments_object(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        out.append(item)
    return out


def render_chat(template: ChatTemplate, messages: Sequence[Mapping[str, Any]], spec: ToolSpec | None,
                *, generic_for_auto: bool) -> str:
    """The prompt for a chat with (or without) tools. Refuses auto on a model whose template cannot render
    tools unless the operator chose the generic prompt for it (`generic_for_auto`)."""
    has_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    offered = spec is not None and spec.mode != "none"
    if template.supports_tools:
        tools = list(spec.tools) if offered and spec is not None else None
        extra = {"tools": tools} if tools else {}
        return template.render(_native_history(messages), add_generation_prompt=True, **extra)
    if offered and spec is not None and spec.mode == "auto" and not generic_for_auto:
        raise invalid_request(
            "this model's chat template cannot render tools, so tool_choice auto has no prompt to work with: "
            "send tool_choice required or a named function (edgeserve then prompts and constrains the call "
            "itself), or start the server with --tool-prompt generic", param="tool_choice")
    if not offered and not has_history:
        return template.render(messages, add_generation_prompt=True)
    system = generic_tool_prompt(spec) if offered and spec is not None else None
    return template.render(_generic_history(messages, system), add_generation_prompt=True)
