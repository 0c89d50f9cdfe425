"""Structured outputs: a request's response_format, checked, as the OutputFormat an engine
keeps to. Only what a local engine can enforce token by token is accepted (OpenAI's strict
subset); anything else is a 400 that names the keyword, never a silently looser answer."""

from __future__ import annotations

import json
from typing import Any, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from bastion.engines.base import OutputFormat
from bastion.errors import InvalidRequestError
from bastion.protocol.common import JsonObjectFormat, JsonSchemaFormat, ResponseFormat

ANY_OBJECT = '{"type": "object"}'
ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$schema", "$id",
               "deprecated", "readOnly", "writeOnly"}
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems",
            "enum", "const", "anyOf", "$ref", "$defs", "definitions", "pattern", "format",
            "minItems", "maxItems", "minLength", "maxLength"}
SCHEMA_MAPS = {"properties", "$defs", "definitions"}
SCHEMA_LISTS = {"anyOf", "prefixItems"}
FORMATS = {"date", "time", "date-time"}
TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPTH = 32


def output_format(fmt: ResponseFormat | None, *, param: str, texts: Iterable[str] = ()
                  ) -> OutputFormat | None:
    """None for free text. `texts`: the prompt's text, where OpenAI requires json_object
    requests to mention JSON (so that the model is told, not only forced)."""
    if isinstance(fmt, JsonObjectFormat):
        if texts and not any("json" in t.lower() for t in texts):
            raise InvalidRequestError(
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'.", param=param, code="invalid_value")
        return OutputFormat(schema=ANY_OBJECT, wire=json.dumps({"type": "json_object"}))
    if isinstance(fmt, JsonSchemaFormat):
        spec = fmt.json_schema
        schema = spec.json_schema if spec.json_schema is not None else {"type": "object"}
        where = f"{param}.json_schema.schema"
        if nesting(schema, MAX_NESTING) > MAX_NESTING:
            raise _refuse(f"The JSON schema nests more than {MAX_NESTING} objects and "
                          f"arrays deep.", where)
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise InvalidRequestError(f"The JSON schema is {len(text)} bytes; at most "
                                      f"{MAX_SCHEMA_BYTES} are allowed.", param=where,
                                      code="invalid_schema")
        check_schema(schema, where)
        return OutputFormat(schema=text, wire=json.dumps(
            {"type": "json_schema", "json_schema": spec.model_dump(by_alias=True,
                                                                   exclude_none=True)}))
    return None


def nesting(value: Any, limit: int) -> int:
    """How deep `value` nests dicts and lists, counted without recursion and only up to
    `limit + 1`: a schema thousands of levels deep must be refused before json.dumps or the
    jsonschema validator recurse into it."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1)
                     for child in (node.values() if isinstance(node, dict) else node))
    return deepest


MAX_NESTING = 4 * MAX_DEPTH  # dicts and lists: a schema level is a few of them


def check_schema(schema: Any, param: str) -> None:
    """A 400 for a schema that is not a JSON Schema, or uses what cannot be enforced."""
    if not isinstance(schema, dict):
        raise InvalidRequestError("The JSON schema must be an object.", param=param,
                                  code="invalid_schema")
    if nesting(schema, MAX_NESTING) > MAX_NESTING:
        raise _refuse(f"The JSON schema nests more than {MAX_NESTING} objects and arrays "
                      f"deep.", param)
    try:
        Draft202012Validator.check_schema(schema)
    except RecursionError:  # a `pattern` nested too deeply for Python's regex parser
        raise _refuse("The JSON schema holds a pattern (or a subschema) nested too deeply.",
                      param) from None
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "#"
        raise InvalidRequestError(f"Invalid JSON schema at '{where}': {exc.message}",
                                  param=param, code="invalid_schema") from exc
    _walk(schema, "#", param, 0)


def _refuse(why: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(why, param=param, code="invalid_schema")


def _walk(node: Any, path: str, param: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise _refuse(f"The schema at '{path}' must be an object.", param)
    if depth > MAX_DEPTH:
        raise _refuse(f"The JSON schema nests deeper than {MAX_DEPTH} levels.", param)
    for key, value in node.items():
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            raise _refuse(f"The JSON schema keyword '{key}' (at '{path}') is not supported "
                          f"for structured outputs: Bastion cannot enforce it while "
                          f"generating. Supported: {', '.join(sorted(ENFORCED))}.", param)
        where = f"{path}/{key}"
        if key in SCHEMA_MAPS:
            for name, sub in value.items():
                _walk(sub, f"{where}/{name}", param, depth + 1)
        elif key in SCHEMA_LISTS:
            for i, sub in enumerate(value):
                _walk(sub, f"{where}/{i}", param, depth + 1)
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            _walk(value, where, param, depth + 1)
        elif key == "format" and value not in FORMATS:
            raise _refuse(f"The string format '{value}' (at '{path}') is not supported for "
                          f"structured outputs; supported: {', '.join(sorted(FORMATS))}.", param)
        elif key == "$ref" and not value.startswith("#"):
            raise _refuse(f"Only local references ('#/$defs/...') are supported, got "
                          f"'{value}' at '{path}'.", param)
        elif key == "type":
            for t in [value] if isinstance(value, str) else value:
                if t not in TYPES:
                    raise _refuse(f"Unknown type '{t}' at '{path}'.", param)
