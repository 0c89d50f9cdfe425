"""What OpenAI's clients rely on besides the bodies: x-request-id, retry headers on 429s, the
newer request fields, errors inside streams, the API at the root as well as under /v1, and
aliases added to the defaults. One server for the module (and one that is shut down)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import httpx
import openai
import pytest
from websockets.sync.client import connect

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, make_tenant, start_server,
                      stop_server)
from polling import poll

EMBED = "all-minilm-l6-v2"
AUTH = bearer(ADMIN_KEY)
HELLO = [{"role": "user", "content": "Name three colours."}]
GENERATED = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Aliases from the environment and the CLI on top of the defaults, one default dropped; a
    90 s tokens window, so a tokens refusal says to retry after more than a minute yet within
    the two minutes the SDK would otherwise wait."""
    server = start_server(
        tmp_path_factory.mktemp("conventions"),
        "--alias", "text-embedding-3-small=all-minilm-l6-v2", "--alias", "all-minilm=",
        env={"BASTION_ALIASES": "gpt-4o-mini=gemma-3-270m,chiro=gemma-3-270m",
             "BASTION_TOKEN_WINDOW_SECONDS": "90"}, embeddings=True)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def sdk(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.api, api_key=ADMIN_KEY, max_retries=0, timeout=120)


# --- x-request-id ---------------------------------------------------------------------------


def test_request_id_generated_echoed_and_logged(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.base_url, timeout=60) as http:
        r = http.get("/v1/models", headers=AUTH)
        assert r.status_code == 200 and GENERATED.fullmatch(r.headers["x-request-id"])
        assert http.get("/v1/models", headers=AUTH).headers["x-request-id"] != \
            r.headers["x-request-id"]
        mine = "client-id_0123:abc"
        r = http.get("/v1/models", headers={**AUTH, "x-request-id": mine})
        assert r.headers["x-request-id"] == mine
        for insane in ("x" * 129, "two words", "tab\there"):
            r = http.get("/v1/models", headers={**AUTH, "x-request-id": insane})
            assert GENERATED.fullmatch(r.headers["x-request-id"]), insane
        # errors, unknown URLs, the dashboard, and a stream
        answers = {
            "401": http.get("/v1/models", headers={"x-request-id": "rid-401"}),
            "404": http.get("/v1/nowhere", headers={**AUTH, "x-request-id": "rid-404"}),
            "400": http.post("/v1/chat/completions", headers={**AUTH, "x-request-id": "rid-400"},
                             json={"model": MODEL}),
            "dashboard": http.get("/dashboard/login", headers={"x-request-id": "rid-dash"}),
        }
        assert [a.status_code for a in answers.values()] == [401, 404, 400, 200]
        for name, a in answers.items():
            assert a.headers["x-request-id"].startswith("rid-"), name
        with http.stream("POST", "/v1/chat/completions",
                         headers={**AUTH, "x-request-id": "rid-stream"},
                         json={"model": MODEL, "messages": HELLO, "max_tokens": 4,
                               "stream": True}) as s:
            assert s.headers["x-request-id"] == "rid-stream"
            assert s.headers["content-type"].startswith("text/event-stream")
            assert list(s.iter_lines())[-2] == "data: [DONE]"
    # one access line per request, naming it by its id
    log = poll(srv.log, lambda text: "rid-stream" in text, timeout=10)
    assert re.search(rf"\[{mine}\]: GET /v1/models 200 ", log)
    assert re.search(r"\[rid-404\]: GET /v1/nowhere 404 ", log)
    assert re.search(r"\[rid-stream\]: POST /v1/chat/completions 200 ", log)


def test_request_id_on_the_websocket_handshake(srv: RunningServer) -> None:
    url = srv.base_url.replace("http://", "ws://") + "/v1/ws"
    with connect(url, additional_headers={"x-request-id": "rid-ws"}) as ws:
        assert ws.response.headers["x-request-id"] == "rid-ws"
    with connect(url) as ws:
        assert GENERATED.fullmatch(ws.response.headers["x-request-id"])


# --- 429s: retry-after-ms, and x-should-retry when waiting is pointless -----------------------


def counting_client(base_url: str, key: str, sent: list[str], retries: int) -> openai.OpenAI:
    hooks = {"request": [lambda request: sent.append(request.url.path)]}
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=retries, timeout=120,
                         http_client=httpx.Client(event_hooks=hooks))


def test_tokens_quota_429_tells_the_sdk_not_to_retry(srv: RunningServer) -> None:
    key = make_tenant(srv.api, "seed", limits={"tokens_per_hour": 40})[1]["key"]
    sent: list[str] = []
    client = counting_client(srv.api, key, sent, retries=2)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=200)
    # without x-should-retry the SDK would sleep the retry-after (60-90 s) and send it again
    assert sent == ["/v1/chat/completions"] and time.monotonic() - started < 30
    headers = caught.value.response.headers
    assert caught.value.body["code"] == "tokens_per_hour_exceeded"
    assert headers["x-should-retry"] == "false"
    assert 60 < int(headers["retry-after"]) <= 90
    assert abs(int(headers["retry-after-ms"]) / 1000 - int(headers["retry-after"])) <= 1


def test_requests_per_minute_429_has_retry_after_ms_and_may_be_retried(
        srv: RunningServer) -> None:
    key = make_tenant(srv.api, "seed", rate_limit=1)[1]["key"]
    with httpx.Client(base_url=srv.api, headers=bearer(key), timeout=60) as http:
        assert http.get("/models").status_code == 200
        r = http.get("/models")
    assert r.status_code == 429 and r.json()["error"]["code"] == "requests_per_minute_exceeded"
    ms, s = int(r.headers["retry-after-ms"]), int(r.headers["retry-after"])
    assert 0 < ms <= 60_000 and s == max(1, -(-ms // 1000))
    assert "x-should-retry" not in r.headers  # a minute is worth the SDK's own retry
    assert r.headers["x-request-id"]


# --- the newer request fields -----------------------------------------------------------------

HINTS: dict[str, Any] = dict(
    service_tier="auto", store=True, metadata={"purpose": "test"}, prompt_cache_key="k-1",
    prompt_cache_retention="in_memory", safety_identifier="user-hash-1", user="u-1",
    reasoning_effort="low", verbosity="low", modalities=["text"], audio=None,
    prediction={"type": "content", "content": "Red, green and blue."},
    stream_options=None)


def counts(usage) -> tuple[int, int, int]:
    """Usage without prompt_tokens_details: a repeated prompt reports its cached tokens."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_newer_fields_are_accepted_and_change_nothing(sdk: openai.OpenAI) -> None:
    args = dict(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    plain = sdk.chat.completions.create(**args)
    hinted = sdk.chat.completions.create(**args, **HINTS)
    assert hinted.choices[0].message.content == plain.choices[0].message.content
    assert counts(hinted.usage) == counts(plain.usage)  # the second reuses cached tokens
    assert hinted.service_tier == plain.service_tier == "default"
    for tier in ("default", "flex"):
        assert sdk.chat.completions.create(**args, service_tier=tier).service_tier == "default"
    chunks = list(sdk.chat.completions.create(
        **args, **{**HINTS, "stream_options": {"include_usage": True}}, stream=True))
    assert {c.service_tier for c in chunks} == {"default"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        plain.choices[0].message.content
    assert counts(chunks[-1].usage) == counts(plain.usage)


@pytest.mark.parametrize("field, value, says", [
    ("service_tier", "priority", "service tier 'priority' is not offered"),
    ("service_tier", "scale", "service tier 'scale' is not offered"),
    ("modalities", ["text", "audio"], "audio output is not supported"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio output is not supported"),
    ("prediction", {"type": "content"}, "Missing required parameter: 'prediction.content'"),
    ("verbosity", "loud", "Invalid value for 'verbosity'"),
])
def test_what_cannot_be_honoured_is_a_400(srv: RunningServer, field: str, value: Any,
                                          says: str) -> None:
    r = httpx.post(srv.api + "/chat/completions", headers=AUTH, timeout=60,
                   json={"model": MODEL, "messages": HELLO, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(field) and says in error["message"], error


def test_developer_role_everywhere(srv: RunningServer, sdk: openai.OpenAI) -> None:
    """`developer` is the system message of newer models: rendered as `system` for templates
    that have no such role (Gemma's folds it into the first user turn)."""
    def messages(role: str) -> list[dict[str, str]]:
        return [{"role": role, "content": "Answer in one word."}, *HELLO]

    args = dict(model=MODEL, max_tokens=10, temperature=0)
    system = sdk.chat.completions.create(messages=messages("system"), **args)
    developer = sdk.chat.completions.create(messages=messages("developer"), **args)
    assert counts(developer.usage) == counts(system.usage)
    assert developer.choices[0].message.content == system.choices[0].message.content
    # the WebSocket
    with connect(srv.base_url.replace("http://", "ws://") + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "auth", "api_key": ADMIN_KEY}))
        assert json.loads(ws.recv(timeout=30))["type"] == "authenticated"
        ws.send(json.dumps({"type": "inference", "messages": messages("developer"), **args}))
        text, done = "", {}
        while not done:
            m = json.loads(ws.recv(timeout=60))
            text += m.get("content", "") if m["type"] == "token" else ""
            done = m if m["type"] != "token" else {}
    assert done["type"] == "done" and text == system.choices[0].message.content
    # the dashboard's playground, signed in with the same key
    with httpx.Client(base_url=srv.base_url, timeout=60) as web:
        form = web.get("/dashboard/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
        assert web.post("/dashboard/login", data={"api_key": ADMIN_KEY,
                                                  "csrf_token": csrf}).status_code == 303
        page = web.get("/dashboard/playground").text
        token = re.search(r'<meta name="csrf-token" content="([^"]+)"', page).group(1)
        r = web.post("/dashboard/api/chat/completions", headers={"x-csrf-token": token},
                     json={"messages": messages("developer"), **args})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == system.choices[0].message.content


# --- the API at the root ----------------------------------------------------------------------


def test_sdk_without_v1_in_base_url(srv: RunningServer, sdk: openai.OpenAI) -> None:
    root = openai.OpenAI(base_url=srv.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    args = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert root.chat.completions.create(**args).choices[0].message.content == \
        sdk.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       root.chat.completions.create(**args, stream=True) if c.choices)
    assert streamed == sdk.chat.completions.create(**args).choices[0].message.content
    assert root.completions.create(model=MODEL, prompt="The sky is", max_tokens=4,
                                   temperature=0).choices[0].text == \
        sdk.completions.create(model=MODEL, prompt="The sky is", max_tokens=4,
                               temperature=0).choices[0].text
    assert root.embeddings.create(model=EMBED, input="hello").data[0].embedding == \
        sdk.embeddings.create(model=EMBED, input="hello").data[0].embedding
    assert {m.id for m in root.models.list()} == {m.id for m in sdk.models.list()}
    assert root.models.retrieve("gemma").id == MODEL
    uploaded = root.files.create(file=("notes.jsonl", b'{"prompt": "a", "completion": "b"}\n'),
                                 purpose="fine-tune")
    assert sdk.files.retrieve(uploaded.id).filename == "notes.jsonl"
    assert root.files.delete(uploaded.id).deleted


def test_root_paths_share_auth_errors_and_leave_the_dashboard_alone(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.base_url, timeout=60) as http:
        for path in ("/models", "/v1/models"):
            r = http.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = http.post("/chat/completions", headers=AUTH, json={"model": "nope", "messages": HELLO})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = http.get("/nowhere", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
        assert http.get("/dashboard/models", follow_redirects=False).status_code in (303, 307)
        assert http.get("/health").json()["status"]
    with connect(srv.base_url.replace("http://", "ws://") + "/ws") as ws:  # the WebSocket too
        ws.send(json.dumps({"type": "auth", "api_key": ADMIN_KEY}))
        assert json.loads(ws.recv(timeout=30)) == {"type": "authenticated"}


# --- aliases ----------------------------------------------------------------------------------


def test_aliases_add_to_the_defaults(srv: RunningServer, sdk: openai.OpenAI) -> None:
    for name in ("gpt-4o-mini", "chiro", "gemma"):  # environment, environment, default
        assert sdk.models.retrieve(name).id == MODEL
    assert sdk.models.retrieve("text-embedding-3-small").id == EMBED  # the CLI's
    assert sdk.embeddings.create(model="text-embedding-3-small", input="hi").model == EMBED
    with pytest.raises(openai.NotFoundError):  # `--alias all-minilm=` dropped a default
        sdk.models.retrieve("all-minilm")
    out = sdk.chat.completions.create(model="chiro", messages=HELLO, max_tokens=2)
    assert out.model == MODEL


def test_a_malformed_alias_stops_the_cli() -> None:
    run = subprocess.run([sys.executable, "-m", "bastion.cli", "serve", "--alias", "=gemma"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "alias is written name=model" in run.stderr


# --- an error inside a stream, and the 503 of a draining server -------------------------------


def test_error_inside_a_stream_raises_api_error(tmp_path) -> None:
    server = start_server(tmp_path, env={"BASTION_DRAIN_TIMEOUT": "3"})
    try:
        client = openai.OpenAI(base_url=server.api, api_key=ADMIN_KEY, max_retries=0,
                               timeout=120)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}],
            max_tokens=3000, temperature=0.8, stream=True)
        chunks = iter(stream)
        next(chunks), next(chunks)
        server.proc.send_signal(signal.SIGTERM)
        refused = poll(lambda: httpx.get(server.api + "/models", headers=AUTH, timeout=10),
                       lambda r: r.status_code == 503, timeout=3, interval=0.05)
        assert refused.status_code == 503
        assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("5", "5000")
        assert refused.headers["x-request-id"]
        with pytest.raises(openai.APIError) as caught:
            for _ in chunks:
                pass
        assert "shutting down" in caught.value.message
        assert caught.value.body["code"] == "service_unavailable"
        assert server.proc.wait(timeout=30) == 0
    finally:
        stop_server(server)
