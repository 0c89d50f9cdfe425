"""Many clients at once: every stream completes correctly and nothing leaks."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import ADMIN_KEY, MODEL, RunningServer, bearer

pytestmark = pytest.mark.slow


async def one_stream(client: httpx.AsyncClient, i: int) -> dict:
    body = {"model": MODEL, "prompt": f"Story number {i}: Once upon a time", "max_tokens": 24,
            "temperature": 0.8, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    text, finish, usage, done = "", None, None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for ch in chunk["choices"]:
                text += ch["text"]
                finish = ch["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    return {"text": text, "finish": finish, "usage": usage, "done": done}


def test_sixteen_concurrent_streams(server: RunningServer) -> None:
    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=180,
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
            return await asyncio.gather(*(one_stream(c, i) for i in range(16)))

    results = asyncio.run(run())
    assert len(results) == 16
    for r in results:
        assert r["done"]
        assert r["finish"] in ("stop", "length")
        assert r["usage"]["completion_tokens"] <= 24
        if r["finish"] == "length":
            assert r["usage"]["completion_tokens"] == 24
        assert r["text"] or r["finish"] == "stop"
    # Every sequence slot is free again afterwards.
    health = httpx.get(server.base_url + "/health",
                       headers=bearer(ADMIN_KEY)).json()["models"][MODEL]
    assert health["running_sequences"] == 0 and health["waiting_requests"] == 0


def test_more_requests_than_slots_queue_and_finish(tmp_path) -> None:
    from conftest import start_server, stop_server

    srv = start_server(tmp_path, "--parallel", "2")
    try:
        async def run() -> list[dict]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=180,
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
                return await asyncio.gather(*(one_stream(c, i) for i in range(6)))

        results = asyncio.run(run())
        assert all(r["done"] and r["finish"] in ("stop", "length") for r in results)
    finally:
        stop_server(srv)
