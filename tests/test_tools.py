"""Tool calling through the official SDK against the real server: calls parse and match their
function's parameters, stream as OpenAI streams them, survive a round trip; bad tools are 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from websockets.sync.client import connect

from conftest import ADMIN_KEY

MODEL = "gemma-3-270m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 40}},
                   "required": ["tz"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_required_tool_call_parses_and_matches_its_parameters(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice="required", parallel_tool_calls=False,
                                       temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0.7, seed=5, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    check_calls(choice.message.tool_calls)


def test_auto_answers_in_text_or_with_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, seed=seed,
                                           max_tokens=60)
        choice = r.choices[0]
        if choice.message.tool_calls:
            check_calls(choice.message.tool_calls)
        if choice.finish_reason == "tool_calls":
            assert choice.message.tool_calls
        else:
            assert choice.finish_reason in ("stop", "length")


def test_streamed_calls_reassemble_with_the_sdk_helper(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                  temperature=0, max_tokens=160)
    # Once first, so that each answer below finds the prompt in the prefix cache and is
    # computed alike: the first to arrive would prefill it in other batches, which round
    # differently on some CPUs and, at a near-tie, pick other arguments (test_prefix_cache).
    client.chat.completions.create(**kwargs)
    whole = client.chat.completions.create(**kwargs).choices[0]
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason
    got = [(c.function.name, c.function.arguments) for c in final.message.tool_calls]
    assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    check_calls(final.message.tool_calls)
    # the raw chunks: the first delta of a call has its id, type and name, later ones arguments
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name
    assert all(d.id is None and d.function.name is None for d in deltas[1:] if d.index == 0)


def test_a_full_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False,
                                           temperature=0, max_tokens=80)
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = ASK + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id,
                      "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=40)
    answer = second.choices[0]
    assert answer.message.content and not answer.message.tool_calls
    # the call and its result are in the second prompt (tool_choice "none": no tool prompt)
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert second.usage.prompt_tokens > plain.usage.prompt_tokens + 30


def test_websocket_done_carries_the_calls(server) -> None:
    with connect(server.base_url.replace("http", "ws") + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "auth", "api_key": ADMIN_KEY}))
        assert json.loads(ws.recv())["type"] == "authenticated"
        ws.send(json.dumps({"type": "inference", "id": "t", "model": MODEL, "messages": ASK,
                            "tools": TOOLS, "tool_choice": "required",
                            "parallel_tool_calls": False, "temperature": 0, "max_tokens": 80}))
        while (msg := json.loads(ws.recv()))["type"] != "done":
            assert msg["type"] == "token", msg
    assert msg["finish_reason"] == "tool_calls"
    (call,) = msg["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        PARAMS[call["function"]["name"]])


@pytest.mark.parametrize("kwargs,param,named", [
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object",
                                    "properties": {"n": {"type": "integer", "minimum": 1}}}}}]},
     "tools[0].function.parameters", "minimum"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "unique"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "bad name"),
    ({"tool_choice": "required"}, None, "tool_choice"),
])
def test_bad_tools_are_400s_that_name_the_problem(client: openai.OpenAI, kwargs: dict,
                                                  param: str | None, named: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, **kwargs)
    assert named in err.value.message, err.value.message
    if param is not None:
        assert err.value.body["param"] == param, err.value.body


def test_a_tool_message_needs_its_call_id(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=8, messages=ASK + [
            {"role": "tool", "content": "21 degrees"}])
    assert "tool_call_id" in err.value.message
