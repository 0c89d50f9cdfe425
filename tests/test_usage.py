"""The usage ledger: one row per request, exact tokens, per day/model/key, scoped to the org."""

from __future__ import annotations

import httpx
import openai

from conftest import ADMIN_KEY, MODEL, RunningServer, make_tenant
from polling import poll

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_usage_is_exact_and_scoped(server: RunningServer) -> None:
    api = server.api
    org, user = make_tenant(api, name="billing")
    admin_key = httpx.post(f"{api}/organizations/{org}/api-keys", headers=ADMIN,
                           json={"name": "a", "permissions": ["admin"]}).json()["key"]
    client = openai.OpenAI(base_url=api, api_key=user["key"], max_retries=0)
    spent = {"prompt": 0, "completion": 0}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=7)
    spent["prompt"] += r.usage.prompt_tokens
    spent["completion"] += r.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9,
                                            stream=True, stream_options={"include_usage": True}))
    spent["prompt"] += chunks[-1].usage.prompt_tokens
    spent["completion"] += chunks[-1].usage.completion_tokens
    # a stream the client abandons is billed for what it generated before leaving
    with httpx.stream("POST", f"{api}/completions", headers={"Authorization": f"Bearer {user['key']}"},
                      json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500,
                            "stream": True}, timeout=60) as s:
        lines = s.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert sum(1 for g in got if g.startswith("data: ")) == 3

    def report(key: str, **params) -> dict:
        return httpx.get(f"{api}/usage", headers={"Authorization": f"Bearer {key}"},
                         params=params).json()

    # the abandoned stream settles a moment after the disconnect
    body = poll(lambda: report(admin_key), lambda body: body["total"]["requests"] == 3,
                timeout=5, interval=0.1)
    assert body["org_id"] == org and body["total"]["requests"] == 3
    (row,) = body["data"]
    assert row["model"] == MODEL and row["key_id"] == user["id"]
    # the abandoned stream had the same prompt as the streamed one
    assert row["prompt_tokens"] == spent["prompt"] + chunks[-1].usage.prompt_tokens
    abandoned = row["completion_tokens"] - spent["completion"]
    assert 3 <= abandoned < 500
    # an inference key sees only its own usage; other organisations do not exist for it
    mine = report(user["key"])["total"]
    r = httpx.post(f"{api}/completions", headers={"Authorization": f"Bearer {admin_key}"},
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
    assert report(user["key"])["total"] == mine
    assert report(admin_key)["total"]["requests"] == 4
    other_org, _ = make_tenant(api, name="neighbour")
    other = httpx.get(f"{api}/usage", headers={"Authorization": f"Bearer {admin_key}"},
                      params={"org_id": other_org})
    assert other.status_code == 404
    assert report(ADMIN_KEY, org_id=org)["total"]["requests"] == 4
    empty = report(admin_key, start_time=1, end_time=2)
    assert empty["data"] == [] and empty["total"]["requests"] == 0
    bad = httpx.get(f"{api}/usage", headers={"Authorization": f"Bearer {admin_key}"},
                    params={"start_time": 10, "end_time": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "start_time"


def test_idempotency_key_bills_once(server: RunningServer) -> None:
    api = server.api
    org, created = make_tenant(api, permissions=("admin",), name="retry")
    key = created["key"]
    auth = {"Authorization": f"Bearer {key}", "Idempotency-Key": "retry-123"}
    for _ in range(3):  # the same request, retried: billed once
        r = httpx.post(f"{api}/completions", headers=auth,
                       json={"model": MODEL, "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200
    usage = httpx.get(f"{api}/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["total"]["requests"] == 1
    # another request that reuses the key is not free
    r = httpx.post(f"{api}/completions", headers=auth,
                   json={"model": MODEL, "prompt": "Something else", "max_tokens": 3})
    assert r.status_code == 200
    usage = httpx.get(f"{api}/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["total"]["requests"] == 2
