"""The Responses API (/v1/responses) through the official SDK against the real server: created,
streamed as typed events, continued with previous_response_id, stored per organisation, and
admitted and billed exactly as chat."""

from __future__ import annotations

from typing import Iterator

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, database_rows, make_tenant,
                      png_data_uri, start_server, stop_server)
from polling import poll


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("responses"), "--parallel", "4")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def tenant(srv: RunningServer) -> tuple[str, dict]:
    return make_tenant(srv.api, "scale", name="responder")


@pytest.fixture(scope="module")
def client(srv: RunningServer, tenant: tuple[str, dict]) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.api, api_key=tenant[1]["key"], max_retries=0, timeout=120)


def test_create_is_billed_as_returned(srv: RunningServer) -> None:
    org, key = make_tenant(srv.api, "scale", name="billed")
    client = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0, timeout=120)
    r = client.responses.create(model=MODEL, instructions="Answer briefly.",
                                input="Name a colour.", temperature=0, max_output_tokens=6)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.output_text  # the SDK's convenience property over the output items
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    assert r.instructions == "Answer briefly." and r.temperature == 0 and r.store is True
    u = r.usage
    assert u.output_tokens == 6 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens == 0
    assert u.output_tokens_details.reasoning_tokens == 0
    # the same conversation as a chat completion: the same prompt, the same text
    chat = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=6,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Name a colour."}])
    assert chat.usage.prompt_tokens == u.input_tokens
    assert chat.choices[0].message.content == r.output_text
    # the ledger holds what the response said it used, under /v1/responses
    rows = poll(lambda: [x for x in database_rows(srv, "usage_records") if x["org_id"] == org],
                lambda rows: len(rows) == 2, timeout=10, interval=0.2)
    (row,) = [x for x in rows if x["endpoint"] == "/v1/responses"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (u.input_tokens, u.output_tokens)
    assert row["request_id"].split("-", 1)[1] == r.id.split("_", 1)[1]
    assert row["key_id"] == key["id"] and row["status"] == "ok"
    report = httpx.get(f"{srv.api}/usage", headers=bearer(key["key"])).json()
    assert report["total"]["requests"] == 2
    assert report["total"]["prompt_tokens"] == u.input_tokens + chat.usage.prompt_tokens


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Once upon a time", temperature=0,
                                max_output_tokens=3)
    Response.model_validate(r.to_dict())  # strictly the SDK's type, not only constructed
    assert r.status == "incomplete"
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    assert r.completed_at is None


def test_stream_events_in_order(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, input="Once upon a time", temperature=0, max_output_tokens=5)
    plain = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == len(kinds) - 8 and deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in deltas)
    assert text == plain.output_text == events[-4].text
    final = events[-1].response
    assert final.output_text == text and final.id == events[0].response.id
    assert events[0].response.status == "in_progress"
    assert final.usage.input_tokens == plain.usage.input_tokens
    assert final.usage.output_tokens == 5
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in deltas)
    # the SDK's stream helper reassembles the same text from the same events
    with client.responses.stream(**args) as stream:
        helped = list(stream)
    assert [e.type for e in helped] == kinds
    assert helped[-1].response.output_text == text
    assert client.responses.retrieve(final.id).output_text == text  # stored when it ended
    assert [e for e in helped if e.type == "response.output_text.delta"][-1].snapshot == text


def test_stream_raw_frames(srv: RunningServer, tenant: tuple[str, dict]) -> None:
    """`event:` lines naming each `data:` event's type, no [DONE], as OpenAI frames them."""
    with httpx.stream("POST", f"{srv.api}/responses", headers=bearer(tenant[1]["key"]),
                      json={"model": MODEL, "input": "Hi", "stream": True,
                            "max_output_tokens": 2, "temperature": 0}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        limits = {k for k in r.headers if k.startswith("x-ratelimit")}
        body = r.read().decode()
    chat = httpx.post(f"{srv.api}/chat/completions", headers=bearer(tenant[1]["key"]),
                      json={"model": MODEL, "max_tokens": 1,
                            "messages": [{"role": "user", "content": "Hi"}]}, timeout=120)
    assert limits and limits == {k for k in chat.headers if k.startswith("x-ratelimit")}
    frames = [f for f in body.split("\n\n") if f]
    assert "[DONE]" not in body
    events = TypeAdapter(ResponseStreamEvent)
    for frame in frames:
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert events.validate_json(data[6:]).type == event[7:]  # strictly the SDK's types


def test_previous_response_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", temperature=0,
                                    max_output_tokens=4)
    second = client.responses.create(model=MODEL, input="What is my name?", temperature=0,
                                     max_output_tokens=4, previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # the second prompt is the whole conversation: exactly what chat counts for it
    chat = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=4,
        messages=[{"role": "user", "content": "My name is Ada."},
                  {"role": "assistant", "content": first.output_text},
                  {"role": "user", "content": "What is my name?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.output_text == chat.choices[0].message.content
    # a third turn continues from the second, which already holds the first
    third = client.responses.create(model=MODEL, input="And again?", temperature=0,
                                    max_output_tokens=2, previous_response_id=second.id)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    # instructions are not carried over, as OpenAI's
    with_instr = client.responses.create(model=MODEL, input="Hi", instructions="Be terse.",
                                         temperature=0, max_output_tokens=2)
    after = client.responses.create(model=MODEL, input="Hi", temperature=0,
                                    max_output_tokens=2, previous_response_id=with_instr.id)
    chat = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=2,
        messages=[{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": with_instr.output_text},
                  {"role": "user", "content": "Hi"}])
    assert after.usage.input_tokens == chat.usage.prompt_tokens


def test_retrieve_list_and_delete(srv: RunningServer, client: openai.OpenAI,
                                  tenant: tuple[str, dict]) -> None:
    r = client.responses.create(
        model=MODEL, temperature=0, max_output_tokens=2, metadata={"run": "7"},
        input=[{"role": "developer", "content": "Be terse."},
               {"role": "user", "content": [{"type": "input_text", "text": "One"}]},
               {"type": "message", "role": "assistant", "content": "Two"},
               {"role": "user", "content": "Three"}])
    Response.model_validate(r.to_dict())
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == r.status
    assert got.usage == r.usage and got.metadata == {"run": "7"}
    items = client.responses.input_items.list(r.id, order="asc")
    ResponseItemList.model_validate(httpx.get(f"{srv.api}/responses/{r.id}/input_items",
                                              headers=bearer(tenant[1]["key"])).json())
    assert [i.role for i in items.data] == ["developer", "user", "assistant", "user"]
    assert items.data[1].content[0].text == "One"
    assert items.data[2].content[0].type == "output_text"
    assert all(i.id for i in items.data) and items.has_more is False
    assert items.first_id == items.data[0].id and items.last_id == items.data[-1].id
    newest = client.responses.input_items.list(r.id, limit=2)  # OpenAI's default: newest first
    assert [i.id for i in newest.data] == [i.id for i in items.data[::-1][:2]]
    assert newest.has_more is True
    rest = client.responses.input_items.list(r.id, limit=2, after=newest.last_id)
    assert [i.id for i in rest.data] == [i.id for i in items.data[1::-1]]
    assert rest.has_more is False
    # every page through the SDK's auto-pagination
    assert [i.id for i in client.responses.input_items.list(r.id, limit=1)] == \
        [i.id for i in items.data[::-1]]
    auth = bearer(tenant[1]["key"])
    gone = httpx.delete(f"{srv.api}/responses/{r.id}", headers=auth)
    assert gone.status_code == 200
    assert gone.json() == {"id": r.id, "object": "response", "deleted": True}
    for method, path in (("GET", ""), ("GET", "/input_items"), ("DELETE", "")):
        again = httpx.request(method, f"{srv.api}/responses/{r.id}{path}", headers=auth)
        assert again.status_code == 404, (method, path)
        assert again.json()["error"]["type"] == "invalid_request_error"
    # the SDK's delete accepts the answer
    other = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    assert client.responses.delete(other.id) is None
    # store=false keeps nothing
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1,
                                       store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=1,
                                previous_response_id=unstored.id)
    assert err.value.body["param"] == "previous_response_id"


def test_another_organisation_sees_nothing(srv: RunningServer, client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Secret", max_output_tokens=1)
    _, stranger = make_tenant(srv.api, "scale", name="stranger")
    auth = bearer(stranger["key"])
    for method, path in (("GET", ""), ("GET", "/input_items"), ("DELETE", "")):
        resp = httpx.request(method, f"{srv.api}/responses/{r.id}{path}", headers=auth)
        assert resp.status_code == 404, (method, path)
        assert resp.json()["error"]["code"] == "not_found"
    resp = httpx.post(f"{srv.api}/responses", headers=auth,
                      json={"model": MODEL, "input": "Go on", "max_output_tokens": 1,
                            "previous_response_id": r.id})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "previous_response_not_found"
    assert client.responses.retrieve(r.id).id == r.id  # still there for its owner


def test_permission_inference_required(srv: RunningServer, client: openai.OpenAI,
                                       tenant: tuple[str, dict]) -> None:
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    org = tenant[0]
    trainer = httpx.post(f"{srv.api}/organizations/{org}/api-keys",
                         headers=bearer(ADMIN_KEY),
                         json={"name": "t", "permissions": ["training"]}).json()["key"]
    for method, path, body in (("POST", "", {"model": MODEL, "input": "Hi"}),
                               ("GET", f"/{r.id}", None), ("DELETE", f"/{r.id}", None),
                               ("GET", f"/{r.id}/input_items", None)):
        resp = httpx.request(method, f"{srv.api}/responses{path}", headers=bearer(trainer),
                             json=body)
        assert resp.status_code == 403, (method, path, resp.text)
        assert resp.json()["error"]["type"] == "authorization_error"


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [{"type": "web_search"}]}, "tools", "web_search"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools", "file_search"),
    ({"background": True}, "background", "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include", "include"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input", "reasoning"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
     "input[0]", "output_text"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "web_search_preview"),
    ({"text": {"format": {"type": "json_schema", "name": "bad name!", "schema": {}}}},
     "text.format", "name"),
    ({"frobnicate": 1}, "frobnicate", "frobnicate"),
    # chat's own 400s, named as the Responses request names the field (after instructions)
    ({"instructions": "Look.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is it?"},
                                     {"type": "input_image", "image_url": png_data_uri()}]}]},
     "input[0].content[1]", "image"),
    ({"max_output_tokens": 10**9}, "max_output_tokens", "max"),
])
def test_refused_with_the_field_named(srv: RunningServer, tenant: tuple[str, dict],
                                      extra: dict, param: str, words: str) -> None:
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1, **extra}
    resp = httpx.post(f"{srv.api}/responses", headers=bearer(tenant[1]["key"]), json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param), error
    assert words in error["message"], error


def test_sdk_sees_refusal(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])
    assert err.value.body["param"] == "tools"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="Hi")


def test_idempotency_key_replays(srv: RunningServer) -> None:
    _, key = make_tenant(srv.api, "scale", name="retrier")
    headers = {**bearer(key["key"]), "Idempotency-Key": "resp-retry-1"}
    body = {"model": MODEL, "input": "Hello", "max_output_tokens": 3}
    first = httpx.post(f"{srv.api}/responses", headers=headers, json=body, timeout=120)
    again = httpx.post(f"{srv.api}/responses", headers=headers, json=body, timeout=120)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    report = httpx.get(f"{srv.api}/usage", headers=bearer(key["key"])).json()
    assert report["total"]["requests"] == 1


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "additionalProperties": False,
                          "required": ["city"],
                          "properties": {"city": {"type": "string",
                                                  "enum": ["Paris", "London"]}}},
           "strict": True}


def test_function_call_round_trip(srv: RunningServer, client: openai.OpenAI,
                                  tenant: tuple[str, dict]) -> None:
    import json

    first = client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                    tools=[WEATHER], tool_choice="required", temperature=0,
                                    parallel_tool_calls=False, max_output_tokens=64)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and first.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id
    assert json.loads(call.arguments)["city"] in ("Paris", "London")
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER], temperature=0,
        max_output_tokens=8,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]
    # streamed: the call's arguments arrive as deltas that add up to the final arguments
    with client.responses.stream(model=MODEL, input="Weather in London?", tools=[WEATHER],
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 temperature=0, max_output_tokens=64) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events
                     if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    streamed = [o for o in final.output if o.type == "function_call"]
    assert deltas == done.arguments == streamed[0].arguments
    assert json.loads(deltas)["city"] in ("Paris", "London")


def test_text_format_json_schema(srv: RunningServer, client: openai.OpenAI,
                                 tenant: tuple[str, dict]) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["answer"],
              "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}}}
    import json

    import jsonschema

    r = client.responses.create(model=MODEL, input="Is the sky blue?", temperature=0,
                                max_output_tokens=32,
                                text={"format": {"type": "json_schema", "name": "a",
                                                 "schema": schema, "strict": True}})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), schema)
    # streamed, the same constrained text (and json_object through the same translation)
    events = list(client.responses.create(
        model=MODEL, input="Is the sky blue?", temperature=0, max_output_tokens=32,
        stream=True, text={"format": {"type": "json_schema", "name": "a", "schema": schema,
                                      "strict": True}}))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == r.output_text
    obj = client.responses.create(model=MODEL, input="Give a JSON object.", temperature=0,
                                  max_output_tokens=24, text={"format": {"type": "json_object"}})
    if obj.status == "completed":  # a small base model may loop until the budget ends
        assert isinstance(json.loads(obj.output_text), dict)
    else:
        assert obj.incomplete_details.reason == "max_output_tokens"


def test_rate_limit_applies_as_on_chat(srv: RunningServer) -> None:
    _, key = make_tenant(srv.api, "scale", rate_limit=1, name="hasty")
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1}
    first = httpx.post(f"{srv.api}/responses", headers=bearer(key["key"]), json=body,
                       timeout=120)
    assert first.status_code == 200
    second = httpx.post(f"{srv.api}/responses", headers=bearer(key["key"]), json=body,
                        timeout=120)
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.json()["error"]["type"] == "rate_limit_error"
    chat = httpx.post(f"{srv.api}/chat/completions", headers=bearer(key["key"]), timeout=120,
                      json={"model": MODEL, "max_tokens": 1,
                            "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 429  # one budget for both endpoints
