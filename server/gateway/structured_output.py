"""Structured output: response_format, `json_schema` or `grammar` -> one OutputConstraint with its GBNF.

The request's response_format (json_object, json_schema) or llama-server's `json_schema` and `grammar` fields
become one OutputConstraint, with the GBNF grammar llama.cpp's grammar sampler enforces.

JSON schemas become GBNF through llama-cpp-python's converter (llama_cpp.llama_grammar, a port of llama.cpp's
json_schema_to_grammar). It enforces structure, types, enum/const, required properties, string patterns,
lengths and item counts, but not every keyword: `check_schema` walks the schema first and refuses, with a
400 that names the place, what is malformed and (with `strict`) every keyword the grammar would not enforce.
Without `strict` those keywords are accepted and not enforced (the README lists them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from server.gateway.backends.features import OutputConstraint
from server.gateway.errors import APIError, invalid_request
from server.gateway.schemas import ChatCompletionRequest, SamplingFields

TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
# Keywords that only describe (or hold definitions reached through $ref): nothing to enforce.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "discriminator"})
ENFORCED = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties", "items",
                      "prefixItems", "minItems", "maxItems", "anyOf", "oneOf", "allOf", "$ref", "pattern",
                      "format", "minLength", "maxLength"})
FORMATS = frozenset({"uuid", "date", "time", "date-time"})
MAX_DEPTH = 64
JSON_OBJECT = {"type": "object"}


def _fail(where: str, message: str) -> APIError:
    return invalid_request(f"{where}: {message}", param=where.split(" ")[0])


def _schemas(value: Any, where: str) -> list[tuple[Any, str]]:
    if not isinstance(value, list) or not value:
        raise _fail(where, "must be a non-empty list of schemas")
    return [(item, f"{where}.{i}") for i, item in enumerate(value)]


def _children(schema: Mapping[str, Any], where: str) -> list[tuple[Any, str]]:
    """The subschemas of `schema`, each with its place."""
    out: list[tuple[Any, str]] = []
    for key in ("properties", "$defs", "definitions"):
        if key in schema:
            if not isinstance(schema[key], Mapping):
                raise _fail(f"{where}.{key}", "must be an object of schemas")
            out += [(v, f"{where}.{key}.{k}") for k, v in schema[key].items()]
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if key in schema:
            out += _schemas(schema[key], f"{where}.{key}")
    items = schema.get("items")
    if isinstance(items, list):
        out += _schemas(items, f"{where}.items")
    elif items is not None:
        out.append((items, f"{where}.items"))
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        out.append((extra, f"{where}.additionalProperties"))
    return out


def _check_node(schema: Any, where: str, strict: bool, root: Mapping[str, Any]) -> None:
    if isinstance(schema, bool):
        raise _fail(where, "boolean schemas are not supported; use {} or a typed schema")
    if not isinstance(schema, Mapping):
        raise _fail(where, "a schema must be a JSON object")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if any(not isinstance(k, str) or k not in TYPES for k in kinds):
        raise _fail(f"{where}.type", f"must be one of {', '.join(sorted(TYPES))} (or a list of them)")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
        raise _fail(f"{where}.required", "must be a list of property names")
    ref = schema.get("$ref")
    if ref is not None:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise _fail(f"{where}.$ref", "only local references (#/...) are supported")
        target: Any = root
        for part in ref[2:].split("/"):
            if not isinstance(target, Mapping) or part not in target:
                raise _fail(f"{where}.$ref", f"{ref} does not resolve")
            target = target[part]
    pattern = schema.get("pattern")
    if pattern is not None and not (isinstance(pattern, str) and pattern.startswith("^")
                                    and pattern.endswith("$")):
        raise _fail(f"{where}.pattern", "must start with ^ and end with $ (grammars match whole strings)")
    if "allOf" in schema and kinds not in ([], ["object"]):
        raise _fail(f"{where}.allOf", "is supported for objects only")
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        if key in schema and (not isinstance(schema[key], int) or isinstance(schema[key], bool)
                              or schema[key] < 0):
            raise _fail(f"{where}.{key}", "must be a non-negative integer")
    if strict:
        for key in schema:
            if key not in ENFORCED and key not in ANNOTATIONS:
                raise _fail(f"{where}.{key}", "is not enforced by edgeserve's grammar; with strict the "
                            "schema may only use keywords the grammar enforces")
        fmt = schema.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise _fail(f"{where}.format", f"only {', '.join(sorted(FORMATS))} are enforced")


def check_schema(schema: Any, where: str, *, strict: bool) -> None:
    """Raise a 400 naming the first part of `schema` that is malformed or (strict) not enforceable."""
    if not isinstance(schema, Mapping):
        raise _fail(where, "a schema must be a JSON object")
    pending = [(schema, where, 0)]
    while pending:
        node, at, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise _fail(at, f"the schema nests deeper than {MAX_DEPTH} levels")
        _check_node(node, at, strict, schema)
        if isinstance(node, Mapping):
            pending += [(child, place, depth + 1) for child, place in _children(node, at)]


def _typed_unions(schema: Any) -> Any:
    """{"type": ["a", "b"], ...} -> {"anyOf": [{"type": "a", ...}, {"type": "b", ...}]}: the converter
    reads a list of types alone and would drop the other keywords."""
    if isinstance(schema, list):
        return [_typed_unions(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _typed_unions(v) for k, v in schema.items()}
    kinds = out.get("type")
    if isinstance(kinds, list) and len(out) > 1:
        rest = {k: v for k, v in out.items() if k != "type"}
        annotations = {k: v for k, v in rest.items() if k in ANNOTATIONS}
        constraints = {k: v for k, v in rest.items() if k not in ANNOTATIONS}
        return {**annotations, "anyOf": [{**constraints, "type": k} for k in kinds]}
    return out


def schema_grammar(schema: Mapping[str, Any], where: str) -> str:
    """GBNF for JSON valid against `schema` (checked with check_schema first)."""
    # Imported here: llama_cpp's package init loads libllama, which a gateway before a remote never needs.
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(_typed_unions(schema)))
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise _fail(where, f"cannot be turned into a grammar: {exc}") from None


def constraint_of(req: SamplingFields) -> OutputConstraint | None:
    """The request's one output constraint (response_format, json_schema or grammar), checked."""
    fmt = req.response_format if isinstance(req, ChatCompletionRequest) else None
    asked = [name for name, value in (("response_format", fmt if fmt and fmt.type != "text" else None),
                                       ("json_schema", req.json_schema), ("grammar", req.grammar))
             if value is not None]
    if len(asked) > 1:
        raise invalid_request(f"{' and '.join(asked)} cannot be combined: give one", param=asked[1])
    if not asked:
        return None
    if req.ignore_eos:
        raise invalid_request("ignore_eos cannot be combined with constrained output: the grammar ends the "
                              "answer with the end-of-text token", param="ignore_eos")
    if req.grammar is not None:
        return OutputConstraint(kind="grammar", grammar=req.grammar)
    if req.json_schema is not None:
        check_schema(req.json_schema, "json_schema", strict=False)
        return OutputConstraint(kind="json_schema", schema=req.json_schema,
                                grammar=schema_grammar(req.json_schema, "json_schema"))
    assert fmt is not None
    if fmt.type == "json_object":
        return OutputConstraint(kind="json_object", schema=JSON_OBJECT,
                                grammar=schema_grammar(JSON_OBJECT, "response_format"))
    spec = fmt.json_schema
    assert spec is not None
    schema = spec.schema_ if spec.schema_ is not None else JSON_OBJECT
    where = "response_format.json_schema.schema"
    check_schema(schema, where, strict=bool(spec.strict))
    return OutputConstraint(kind="json_schema", schema=schema, grammar=schema_grammar(schema, where),
                            name=spec.name, strict=bool(spec.strict))
