"""Disconnects free their sequence at once; SIGTERM drains, then ends what is left cleanly."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from conftest import ADMIN_KEY, MODEL, start_server, stop_server
from polling import poll

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0.8,
        "stream": True}


def read_chunks(lines, n: int) -> list[str]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:])
            if len(out) >= n:
                break
    return out


def running_sequences(url: str) -> int:
    """How many sequences the bundled model is generating now, from /health."""
    return httpx.get(url + "/health", headers=AUTH).json()["models"][MODEL]["running_sequences"]


@pytest.fixture
def one_slot(tmp_path):
    srv = start_server(tmp_path, "--parallel", "1")
    yield srv
    stop_server(srv)


def test_disconnect_frees_the_only_slot(one_slot) -> None:
    url = one_slot.base_url
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=LONG) as r:
            assert r.status_code == 200
            assert len(read_chunks(r.iter_lines(), 3)) == 3
        # The client went away after 3 of 3000 tokens: the slot must be free within moments,
        # not after the ~40 s the rest of the generation would take.
        poll(lambda: running_sequences(url) == 0, timeout=5, interval=0.05)
        assert httpx.get(url + "/health", headers=AUTH).json()["models"][MODEL]["running_sequences"] == 0
        t = time.time()
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert time.time() - t < 5


def test_disconnect_of_non_streamed_request(one_slot) -> None:
    url = one_slot.base_url
    body = {**LONG, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=1.5)
    poll(lambda: running_sequences(url) == 0, timeout=5, interval=0.05)
    assert httpx.get(url + "/health", headers=AUTH).json()["models"][MODEL]["running_sequences"] == 0


def test_sigterm_drains_running_streams(tmp_path) -> None:
    # a drain long enough for a loaded machine (2 cores shared with other work can fall to a
    # few tokens per second); a quiet one finishes the stream in seconds
    srv = start_server(tmp_path, env={"BASTION_DRAIN_TIMEOUT": "120"})
    try:
        result: dict = {}
        started = threading.Event()

        def stream() -> None:
            body = {**LONG, "max_tokens": 100, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", srv.api + "/completions", json=body, headers=AUTH,
                              timeout=150) as r:
                chunks = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line)
                        started.set()
                result["chunks"] = chunks

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(srv.api + "/completions", headers=AUTH,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
        t.join(150)
        chunks = result["chunks"]
        assert chunks[-1] == "data: [DONE]"
        finals = [json.loads(c[6:]) for c in chunks[:-1]]
        assert all("error" not in c for c in finals)
        assert finals[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        usage = finals[-1]["usage"]
        assert usage["completion_tokens"] == 100 or finals[-2]["choices"][0]["finish_reason"] == "stop"
        assert srv.proc.wait(timeout=30) == 0
    finally:
        stop_server(srv)


def test_sigterm_after_drain_timeout_ends_stream_with_error(tmp_path) -> None:
    srv = start_server(tmp_path, env={"BASTION_DRAIN_TIMEOUT": "1"})
    try:
        with httpx.stream("POST", srv.api + "/completions", json=LONG, headers=AUTH,
                          timeout=60) as r:
            lines = r.iter_lines()
            assert len(read_chunks(lines, 2)) == 2
            srv.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])
        assert error["error"]["type"] == "server_error"
        assert error["error"]["code"] == "service_unavailable"
        assert "shutting down" in error["error"]["message"]
        assert srv.proc.wait(timeout=30) == 0
    finally:
        stop_server(srv)


def test_non_streamed_request_cut_by_shutdown_gets_503(tmp_path) -> None:
    srv = start_server(tmp_path, env={"BASTION_DRAIN_TIMEOUT": "1"})
    try:
        result: dict = {}

        def call() -> None:
            result["r"] = httpx.post(srv.api + "/completions", headers=AUTH, timeout=60,
                                     json={**LONG, "stream": False})

        t = threading.Thread(target=call)
        t.start()
        poll(lambda: running_sequences(srv.base_url), timeout=10, interval=0.05)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(60)
        r = result["r"]
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "service_unavailable"
        assert srv.proc.wait(timeout=30) == 0
    finally:
        stop_server(srv)
