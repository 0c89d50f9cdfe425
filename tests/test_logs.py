"""BASTION_LOG_FORMAT=json against a real server: every log line is one JSON object, each request
has a line with its request id, key, model, status, tokens and latencies, and no line holds
key material."""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import pytest

from conftest import MODEL, RunningServer, bearer, make_tenant, start_server, stop_server
from polling import poll

PRINTED = ("Bastion on http://",)  # the startup banner is printed, not logged


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("logs"), "--parallel", "2", "--no-worker",
                     env={"BASTION_LOG_FORMAT": "json"})
    yield s
    stop_server(s)


def log_lines(srv: RunningServer) -> list[dict]:
    lines = []
    for text in srv.log().splitlines():
        if not text.strip() or text.startswith(PRINTED):
            continue
        lines.append(json.loads(text))  # fails on any line that is not JSON
    return lines


def test_json_lines_say_who_what_and_how_long(srv: RunningServer) -> None:
    org, key = make_tenant(srv.api, name="logged")
    h = bearer(key["key"])
    ok = httpx.post(srv.api + "/chat/completions", headers=h, timeout=120,
                    json={"model": MODEL, "max_tokens": 6, "temperature": 0,
                          "messages": [{"role": "user", "content": "Say hi."}]})
    assert ok.status_code == 200, ok.text
    missing = httpx.post(srv.api + "/chat/completions", headers=h,
                         json={"model": "no-such-model",
                               "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 404
    httpx.get(srv.api + "/models", headers=bearer("sk-bst-not-a-real-key-0123456789"))

    # a request's line is written after its response's last byte: wait for the last one's
    assert poll(lambda: any(line.get("route") == "/v1/models" for line in log_lines(srv)),
                timeout=10, interval=0.1)
    lines = log_lines(srv)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's too
    requests = [line for line in lines if line["logger"] == "bastion.access"]
    chat = [r for r in requests if r["route"] == "/v1/chat/completions"]
    done = next(r for r in chat if r["status"] == 200)
    usage = ok.json()["usage"]
    assert done["request_id"] == ok.headers.get("x-request-id")
    assert done["key_id"] == key["id"] and done["org_id"] == org
    assert done["model"] == MODEL and done["outcome"] == "ok"
    assert done["prompt_tokens"] == usage["prompt_tokens"]
    assert done["completion_tokens"] == usage["completion_tokens"]
    assert 0 < done["ttft_ms"] <= done["duration_ms"]
    assert 0 < done["queue_and_prefill_ms"] <= done["ttft_ms"]
    refused = next(r for r in chat if r["status"] == 404)
    assert refused["key_id"] == key["id"] and "model" not in refused
    unauthenticated = next(r for r in requests if r["route"] == "/v1/models")
    assert unauthenticated["status"] == 401 and "key_id" not in unauthenticated


def test_no_key_material_in_json_logs(srv: RunningServer) -> None:
    _, key = make_tenant(srv.api, name="secret")
    raw = key["key"]
    h = bearer(raw)
    httpx.post(srv.api + "/completions", headers=h, timeout=120,
               json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    httpx.post(srv.api + "/completions", headers=h, json={"model": "nope", "prompt": "x"})
    httpx.get(srv.api + "/organizations", headers=h)
    assert poll(lambda: any(line.get("key_id") == key["id"] and line.get("method") == "GET"
                            for line in log_lines(srv)), timeout=10, interval=0.1)
    assert raw[len(key["prefix"]):] not in srv.log()
