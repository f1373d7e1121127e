"""Chat templates: the model's own jinja2 template from the GGUF (tokenizer.chat_template), or ChatML."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# What llama-server falls back to when a model carries no template.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with this template (the template raised, or a message is malformed)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # transformers' tojson: no HTML escaping and unicode kept, unlike jinja2's built-in filter
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _content_text(content: Any) -> str:
    """OpenAI message content as plain text: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise ChatTemplateError("only text content parts are supported")
        return "".join(texts)
    raise ChatTemplateError("message content must be a string or a list of text parts")


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ChatTemplateError(f"message {i} has no role")
        item = dict(message)
        item["role"] = str(message["role"])
        item["content"] = _content_text(message.get("content"))
        out.append(item)
    return out


# A function no template writes by itself: it shows in the output only if the template renders `tools`.
_PROBE_TOOL = {"type": "function", "function": {
    "name": "edgeserve_probe_tool", "description": "probe",
    "parameters": {"type": "object", "properties": {}}}}


class ChatTemplate:
    """A compiled chat template. `is_fallback` when the model had none and ChatML stands in."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.is_fallback = not source
        self.source = source or CHATML_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the template renders the `tools` it is given (as llama.cpp's minja probes it)."""
        try:
            text = self.render([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL])
        except ChatTemplateError:
            return False
        return "edgeserve_probe_tool" in text

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text for `messages` (OpenAI-style dicts with role and content)."""
        try:
            return self._template.render(
                messages=normalize_messages(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as exc:
            raise ChatTemplateError(f"cannot render the chat template: {exc}") from exc
