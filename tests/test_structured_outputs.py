"""Structured outputs through the official SDK against the real server and bundled model:
every answer that finishes parses and validates; what cannot be enforced is a 400."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

MODEL = "gemma-3-270m"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "$defs": {
        "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                  "required": ["x", "y"], "additionalProperties": False},
    },
    "properties": {
        "label": {"anyOf": [{"type": "string", "maxLength": 16}, {"type": "null"}]},
        "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1,
                   "maxItems": 2},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["label", "points", "when"],
    "additionalProperties": False,
}


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def check_valid(text: str, schema: dict | None) -> None:
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, schema)


def test_json_schema_answer_validates(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a user of a web shop."}],
        temperature=0, max_tokens=150, response_format=schema_format(PERSON))
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    check_valid(choice.message.content, PERSON)


def test_json_object_mode_needs_the_word_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        max_tokens=120, temperature=0.7, seed=3, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        check_valid(r.choices[0].message.content, None)
    else:
        assert r.usage.completion_tokens == 120
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me about cats."}],
            max_tokens=8, response_format={"type": "json_object"})
    assert "json" in err.value.message.lower() and err.value.body["param"] == "response_format"


def test_a_cut_off_answer_is_length_not_stop(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a user."}],
        temperature=0, max_tokens=5, response_format=schema_format(PERSON))
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_fifty_mixed_concurrent_requests_all_validate(client: openai.OpenAI) -> None:
    """60 requests, 16 at a time: json_schema (bounded schemas: every answer must finish),
    with n > 1, streaming and stop sequences, json_object, and free text among them. 100 % of
    the schema answers finish and validate; json_object answers that finish are objects."""

    def one(i: int) -> list[tuple[str, str, dict | None, str]]:
        kind = i % 5
        schema = None
        kwargs: dict = {"model": MODEL, "max_tokens": 300, "temperature": [0, 0.8, 1.0][i % 3],
                        "seed": i}
        prompt = f"Request {i}: describe someone as JSON."
        if kind == 0:
            kwargs["response_format"] = {"type": "json_object"}
            kwargs["max_tokens"] = 120
        elif kind in (1, 2):
            schema = PERSON
            kwargs["response_format"] = schema_format(PERSON)
            if kind == 2:
                kwargs["n"] = 2
                kwargs["stop"] = ["}", "\""]  # stop sequences never cut a constrained answer
        elif kind == 3:
            schema = NESTED
            kwargs["response_format"] = schema_format(NESTED, "shape")
        else:  # free text among them
            kwargs["max_tokens"] = 40
            client.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                           **kwargs)
            return []
        messages = [{"role": "user", "content": prompt}]
        name = "object" if schema is None else "schema"
        if i % 2:
            stream = client.chat.completions.create(messages=messages, stream=True, **kwargs)
            texts: dict[int, str] = {}
            reasons: dict[int, str] = {}
            for chunk in stream:
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                    if c.finish_reason:
                        reasons[c.index] = c.finish_reason
            return [(reasons[k], texts[k], schema, name) for k in texts]
        r = client.chat.completions.create(messages=messages, **kwargs)
        return [(c.finish_reason, c.message.content, schema, name) for c in r.choices]

    with ThreadPoolExecutor(16) as pool:
        results = [item for items in pool.map(one, range(60)) for item in items]
    schema_answers = [r for r in results if r[3] == "schema"]
    assert len(schema_answers) == 48 and len(results) == 60  # 12 of them from n=2
    for reason, text, schema, name in results:
        if name == "schema":
            assert reason == "stop", (reason, text)
        if reason == "stop":
            check_valid(text, schema)
        else:
            assert reason == "length"


def test_completions_take_a_response_format(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="A user record:", temperature=0,
                                  max_tokens=150, extra_body={"response_format": schema_format(PERSON)})
    assert r.choices[0].finish_reason == "stop"
    check_valid(r.choices[0].text, PERSON)


@pytest.mark.parametrize("schema,named", [
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}, "minimum"),
    ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patternProperties"),
    ({"type": "object", "properties": {"e": {"type": "string", "format": "email"}}}, "email"),
    ({"type": "object", "properties": {"r": {"$ref": "https://example.com/s.json"}}}, "local"),
    ({"type": "banana"}, "banana"),
    ({"type": "object", "required": "name"}, "required"),
])
def test_schemas_that_cannot_be_enforced_are_400s_that_name_the_problem(
        client: openai.OpenAI, schema: dict, named: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            response_format=schema_format(schema))
    assert named in err.value.message, err.value.message
    assert err.value.body["param"] == "response_format.json_schema.schema"
    assert err.value.code == "invalid_schema"


def test_malformed_response_format_is_a_400(client: openai.OpenAI) -> None:
    for fmt in ({"type": "xml"}, {"type": "json_schema"},
                {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, max_tokens=4, response_format=fmt,
                                           messages=[{"role": "user", "content": "json"}])
