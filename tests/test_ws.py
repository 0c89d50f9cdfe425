"""The WebSocket API (/v1/ws) with the `websockets` client against the bundled model."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from conftest import (ADMIN_KEY, MODEL, RunningServer, database_rows, make_tenant,
                      start_server, stop_server)
from polling import poll

HELLO = [{"role": "user", "content": "Name three colours."}]


def ws_url(server: RunningServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/ws"


def recv(ws: ClientConnection, timeout: float = 60) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


@contextmanager
def authed(server: RunningServer, key: str = ADMIN_KEY) -> Iterator[ClientConnection]:
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "auth", "api_key": key}))
        assert recv(ws) == {"type": "authenticated"}
        yield ws


def run(ws: ClientConnection, rid: str | None = None, **body: Any) -> tuple[str, dict]:
    """Send one inference and collect its tokens until its done (or error) message."""
    msg = {"type": "inference", "model": MODEL, "messages": HELLO, **body}
    if rid is not None:
        msg["id"] = rid
    ws.send(json.dumps(msg))
    text = ""
    while True:
        m = recv(ws)
        if m["type"] == "token":
            text += m["content"]
        else:
            return text, m


def test_streams_like_chat_completions(server: RunningServer, client: openai.OpenAI) -> None:
    args = dict(max_tokens=30, temperature=0, seed=3)
    want = client.chat.completions.create(model=MODEL, messages=HELLO, **args)
    with authed(server) as ws:
        text, done = run(ws, **args)
    assert text == want.choices[0].message.content
    assert done["type"] == "done"
    assert done["finish_reason"] == want.choices[0].finish_reason
    usage = want.usage.model_dump(exclude_none=True)
    # the socket's request repeats the prompt: its cached tokens are the prompt's, less one
    assert done["usage"].pop("prompt_tokens_details") == {"cached_tokens":
                                                          usage["prompt_tokens"] - 1}
    usage.pop("prompt_tokens_details", None)
    assert done["usage"] == usage
    assert done["completion_id"].startswith("chatcmpl-") and done["model"] == MODEL


def test_bearer_header_on_upgrade_and_non_streaming(server: RunningServer) -> None:
    with connect(ws_url(server), additional_headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as ws:
        assert recv(ws) == {"type": "authenticated"}
        text, done = run(ws, "q", max_tokens=12, temperature=0, stream=False)
    assert text == ""  # no token messages when stream is false
    assert done["id"] == "q" and done["content"] and done["usage"]["completion_tokens"] <= 12
    with connect(ws_url(server), additional_headers={"Authorization": "Bearer sk-bst-wrong"}) as ws:
        err = recv(ws)
        assert err["type"] == "error" and err["error"]["type"] == "authentication_error"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1008


def test_two_requests_at_once_on_one_socket(server: RunningServer, client) -> None:
    args = dict(max_tokens=40, temperature=0, seed=1)
    prompts = {"a": [{"role": "user", "content": "Count from one to twenty."}],
               "b": [{"role": "user", "content": "List some animals."}]}
    want = {k: client.chat.completions.create(model=MODEL, messages=m, **args)
            for k, m in prompts.items()}
    texts = {"a": "", "b": ""}
    order: list[str] = []
    done: dict[str, dict] = {}
    with authed(server) as ws:
        for rid, messages in prompts.items():
            ws.send(json.dumps({"type": "inference", "id": rid, "model": MODEL,
                                "messages": messages, **args}))
        while len(done) < 2:
            m = recv(ws)
            assert m["type"] in ("token", "done"), m
            order.append(m["id"])
            if m["type"] == "token":
                texts[m["id"]] += m["content"]
            else:
                done[m["id"]] = m
    # each id got its own prompt and its own continuation (batched greedy decoding may pick
    # another token than a lone one where two are nearly tied, so the texts are not compared)
    for rid in prompts:
        assert done[rid]["usage"]["prompt_tokens"] == want[rid].usage.prompt_tokens
        assert texts[rid] and done[rid]["finish_reason"] in ("stop", "length")
    assert texts["a"] != texts["b"]
    # both generations were running at the same time: their tokens interleave
    assert set(order[:len(order) // 2]) == {"a", "b"}, order
    assert all(d["usage"]["completion_tokens"] > 0 for d in done.values())


def test_cancel_and_disconnect_free_the_slot(server: RunningServer) -> None:
    _, key = make_tenant(server.api, limits={"concurrent_requests": 1}, name="ws-one-slot")
    long = dict(max_tokens=1000, temperature=0.8,
                messages=[{"role": "user", "content": "Write a very long story."}])
    with authed(server, key["key"]) as ws:
        ws.send(json.dumps({"type": "inference", "id": 1, "model": MODEL, **long}))
        assert recv(ws)["type"] == "token"
        # the plan's only slot is taken: a second request is refused with the HTTP body
        text, refused = run(ws, "second", max_tokens=5)
        assert refused["type"] == "error" and refused["id"] == "second"
        assert refused["error"]["type"] == "rate_limit_error"
        assert refused["error"]["code"] == "concurrency_limit_exceeded"
        assert refused["error"]["retry_after"] >= 1
        ws.send(json.dumps({"type": "cancel", "id": 1}))
        while (m := recv(ws))["type"] == "token":
            pass
        assert m["type"] == "done" and m["id"] == 1 and m["finish_reason"] == "cancelled"
        assert 0 < m["usage"]["completion_tokens"] < 1000
        text, done = run(ws, "after-cancel", max_tokens=5)  # the slot is free again
        assert done["type"] == "done", done
        ws.send(json.dumps({"type": "inference", "id": "left", "model": MODEL, **long}))
        assert recv(ws)["type"] == "token"
    auth = {"Authorization": f"Bearer {key['key']}"}
    # the socket closed mid-generation: its slot comes back at once
    r = poll(lambda: httpx.post(f"{server.api}/chat/completions", headers=auth, timeout=60,
                                json={"model": MODEL, "messages": HELLO, "max_tokens": 3}),
             lambda r: r.status_code == 200, timeout=10, interval=0.2)
    assert r.status_code == 200, r.text


def test_limits_permissions_and_ledger(server: RunningServer) -> None:
    org, key = make_tenant(server.api, rate_limit=2, name="ws-rpm")
    with authed(server, key["key"]) as ws:
        for i in range(2):
            assert run(ws, i, max_tokens=2)[1]["type"] == "done"
        _, refused = run(ws, "third", max_tokens=2)
    assert refused["error"]["code"] == "requests_per_minute_exceeded"
    rows = poll(lambda: [r for r in database_rows(server, "usage_records")
                         if r["org_id"] == org and r["endpoint"] == "/v1/ws"],
                lambda rows: len(rows) >= 2, timeout=10)
    assert len(rows) == 2 and all(r["completion_tokens"] > 0 and r["model"] == MODEL
                                  for r in rows)
    _, trainer = make_tenant(server.api, permissions=("training",), name="ws-trainer")
    with authed(server, trainer["key"]) as ws:
        _, denied = run(ws, "x", max_tokens=2)
    assert denied["error"]["type"] == "authorization_error"
    assert "inference" in denied["error"]["message"]


def test_revocation_applies_to_an_open_socket(server: RunningServer) -> None:
    org, key = make_tenant(server.api, name="ws-revoked")
    with authed(server, key["key"]) as ws:
        assert run(ws, 1, max_tokens=2)[1]["type"] == "done"
        r = httpx.delete(f"{server.api}/organizations/{org}/api-keys/{key['id']}",
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200
        _, after = run(ws, 2, max_tokens=2)
    assert after["error"]["code"] == "api_key_revoked"


def test_protocol_errors_never_crash(server: RunningServer) -> None:
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "inference", "id": 7, "model": MODEL, "messages": HELLO}))
        m = recv(ws)
        assert m["id"] == 7 and m["error"]["code"] == "not_authenticated"
        ws.send(json.dumps({"type": "auth", "api_key": "sk-bst-not-a-key"}))
        assert recv(ws)["error"]["code"] == "invalid_api_key"
        ws.send("{not json")
        assert recv(ws)["error"]["code"] == "invalid_json"
        ws.send(b"\x00\x01")
        assert recv(ws)["error"]["code"] == "invalid_message"
        ws.send(json.dumps([1, 2]))
        assert recv(ws)["error"]["code"] == "invalid_message"
        ws.send(json.dumps({"type": "ping", "id": "p"}))
        assert recv(ws) == {"type": "pong", "id": "p"}
        ws.send(json.dumps({"type": "auth", "api_key": ADMIN_KEY}))
        assert recv(ws)["type"] == "authenticated"
        ws.send(json.dumps({"type": "auth", "api_key": ADMIN_KEY}))
        assert recv(ws)["error"]["code"] == "already_authenticated"
        ws.send(json.dumps({"type": "dance"}))
        assert recv(ws)["error"]["param"] == "type"
        ws.send(json.dumps({"type": "ping", "id": {"x": 1}}))
        assert recv(ws)["error"]["param"] == "id"
        _, bad = run(ws, "t", temperature=5)
        assert bad["error"]["param"] == "temperature" and bad["id"] == "t"
        _, bad = run(ws, "u", messages=[])
        assert bad["error"]["param"] == "messages"
        _, bad = run(ws, "m", model="no-such-model")
        assert bad["error"]["code"] == "model_not_found"
        ws.send(json.dumps({"type": "cancel", "id": "nothing"}))
        assert recv(ws)["error"]["code"] == "not_found"
        _, ok = run(ws, "still-fine", max_tokens=2)
        assert ok["type"] == "done"


def closed_code(ws: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    return closed.value.rcvd.code


def test_auth_attempts_are_limited_per_socket(server: RunningServer) -> None:
    """Three wrong keys and the socket is closed: no key-guessing loop on one connection."""
    with connect(ws_url(server)) as ws:
        for attempt in range(3):
            ws.send(json.dumps({"type": "auth", "api_key": f"sk-bst-guess-{attempt}"}))
            assert recv(ws)["error"]["code"] == "invalid_api_key"
        m = recv(ws)
        assert m["error"]["code"] == "too_many_auth_attempts", m
        assert closed_code(ws) == 1008
    with authed(server) as ws:  # a fresh socket with the right key is unaffected
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws)["type"] == "pong"


def test_big_frames_before_auth_close_the_socket(server: RunningServer) -> None:
    """Before auth a message is an auth message: a 1 MiB frame closes the socket; after auth
    the same frame is an ordinary (here: invalid) request."""
    big = json.dumps({"type": "auth", "api_key": "k" * (1 << 20)})
    with connect(ws_url(server)) as ws:
        ws.send(big)
        m = recv(ws)
        assert m["error"]["code"] == "message_too_large" and "16384" in m["error"]["message"]
        assert closed_code(ws) == 1008
    with authed(server) as ws:
        ws.send(json.dumps({"type": "ping", "pad": "p" * (1 << 20)}))
        assert recv(ws)["type"] == "pong"


def test_unauthenticated_socket_is_closed(tmp_path) -> None:
    srv = start_server(tmp_path, "--no-bundled", env={"BASTION_WS_AUTH_TIMEOUT": "1"})
    try:
        with connect(ws_url(srv)) as ws:
            started = time.monotonic()
            m = recv(ws, timeout=10)
            assert m["type"] == "error" and m["error"]["code"] == "auth_timeout"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1008
            assert time.monotonic() - started < 5
    finally:
        stop_server(srv)
