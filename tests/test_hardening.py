"""Security review findings (issue 15), each through the real server: an Idempotency-Key replay
never generates without billing, and a key over its limits is refused before any expensive
work (image decoding, template rendering, tokenising)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
from PIL import Image

from conftest import MODEL, RunningServer, bearer, make_tenant
from polling import poll

HI = [{"role": "user", "content": "Say hello."}]


def usage_total(api: str, key: str) -> dict:
    r = httpx.get(f"{api}/usage", headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()["total"]


def test_idempotent_retry_replays_the_first_response(server: RunningServer) -> None:
    api = server.api
    _, created = make_tenant(api, permissions=("admin",), name="replay")
    key = created["key"]
    headers = {**bearer(key), "Idempotency-Key": "replay-1"}
    body = {"model": MODEL, "messages": HI, "max_tokens": 8, "temperature": 1.0}
    first = httpx.post(f"{api}/chat/completions", headers=headers, json=body, timeout=60)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = httpx.post(f"{api}/chat/completions", headers=headers, json=body, timeout=60)
        assert again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        # the very same response: same id, same sampled text (temperature 1), same usage
        assert again.json() == first.json()
    total = usage_total(api, key)
    assert total["requests"] == 1
    assert total["completion_tokens"] == first.json()["usage"]["completion_tokens"]


def test_streamed_replay_and_409_while_running(server: RunningServer) -> None:
    api = server.api
    _, created = make_tenant(api, permissions=("admin",), name="replay-stream")
    key = created["key"]
    headers = {**bearer(key), "Idempotency-Key": "stream-1"}
    body = {"model": MODEL, "messages": HI, "max_tokens": 48, "stream": True,
            "temperature": 1.0}

    async def run() -> tuple[bytes, int, bytes]:
        async with httpx.AsyncClient(base_url=api, timeout=60) as client:
            async with client.stream("POST", "/chat/completions", headers=headers,
                                     json=body) as r:
                assert r.status_code == 200
                raw_chunks = r.aiter_raw()
                chunks = [await raw_chunks.__anext__()]
                # the first is still streaming: a retry is told so, and nothing runs twice
                during = await client.post("/chat/completions", headers=headers, json=body)
                async for raw in raw_chunks:
                    chunks.append(raw)
            return b"".join(chunks), during.status_code, during.content

    streamed, status, refusal = asyncio.run(run())
    assert status == 409
    assert json.loads(refusal)["error"]["code"] == "idempotency_key_in_use"
    assert streamed.endswith(b"data: [DONE]\n\n")
    replay = httpx.post(f"{api}/chat/completions", headers=headers, json=body, timeout=60)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.content == streamed
    assert usage_total(api, key)["requests"] == 1


def test_aborted_first_request_is_billed_and_its_retry_billed_again(
        server: RunningServer) -> None:
    """The replay exploit: cut the first request off after one chunk, then retry with the same
    key. Whatever is generated is billed: one ledger row per generation, never one for all."""
    api = server.api
    _, created = make_tenant(api, permissions=("admin",), name="replay-abort")
    key = created["key"]
    headers = {**bearer(key), "Idempotency-Key": "abort-1"}
    body = {"model": MODEL, "messages": HI, "max_tokens": 200, "stream": True}
    generations = 3
    for _ in range(generations):
        with httpx.stream("POST", f"{api}/chat/completions", headers=headers, json=body,
                          timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":"' in line \
                        and '"content":""' not in line:
                    break  # one token seen: hang up
    # a hung-up stream settles when its generation unwinds, a moment after
    total = poll(lambda: usage_total(api, key), lambda t: t["requests"] >= generations,
                 timeout=15)
    assert total["requests"] == generations, total
    assert total["completion_tokens"] >= generations


def _png(size: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_key_over_its_rate_is_refused_before_images_are_decoded(server: RunningServer) -> None:
    api = server.api
    _, created = make_tenant(api, rate_limit=1, name="rpm-before-work")
    key = created["key"]
    ok = httpx.post(f"{api}/chat/completions", headers=bearer(key),
                    json={"model": MODEL, "messages": HI, "max_tokens": 1})
    assert ok.status_code == 200
    image = _png(512)
    heavy = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}] + [
        {"type": "image_url", "image_url": {"url": image}} for _ in range(8)]}]}
    r = httpx.post(f"{api}/chat/completions", headers=bearer(key), json=heavy)
    # today's answer for a key within its rate would be the 400 "no image input"; over its
    # rate, the 429 comes first, before any image is decoded
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "requests_per_minute_exceeded"
    assert "retry-after" in r.headers
