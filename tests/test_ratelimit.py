"""Plans and limits through the real server: concurrency, tokens per request and per hour,
requests per minute, headers, and slots released on every exit path."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, MODEL, make_tenant, start_server, stop_server
from polling import poll

HI = [{"role": "user", "content": "Hi"}]


def new_tenant(api: str, plan: str, limits: dict | None = None,
               rate_limit: int | None = None) -> str:
    return make_tenant(api, plan, limits=limits, rate_limit=rate_limit)[1]["key"]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server whose tokens-per-hour window is 15 s, so that its restoration can be seen
    (short, yet long enough that a loaded machine finishes a small request inside it)."""
    srv = start_server(tmp_path_factory.mktemp("limits"), "--parallel", "8",
                       env={"BASTION_TOKEN_WINDOW_SECONDS": "15"})
    yield srv
    stop_server(srv)


def test_burst_of_200_admits_exactly_5(limited) -> None:
    key = new_tenant(limited.api, "spark")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 120, "stream": True}

    async def one(client: httpx.AsyncClient) -> tuple[int, dict | None, dict]:
        async with client.stream("POST", "/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, r.json(), dict(r.headers)
            async for _ in r.aiter_lines():
                pass
            return 200, None, dict(r.headers)

    async def burst() -> list:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=limited.api, timeout=120, limits=limits,
                                     headers={"Authorization": f"Bearer {key}"}) as c:
            return await asyncio.gather(*(one(c) for _ in range(200)))

    results = asyncio.run(burst())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) == 5 and len(refused) == 195
    status, err, headers = refused[0]
    assert err["error"]["type"] == "rate_limit_error"
    assert err["error"]["code"] == "concurrency_limit_exceeded"
    assert err["error"]["message"] == ("Rate limit reached for concurrent requests: your "
                                       "organization already has 5 of 5 requests running.")
    assert err["error"]["retry_after"] == 1 and headers["retry-after"] == "1"
    # every slot came back: the next five run again
    client = openai.OpenAI(base_url=limited.api, api_key=key, max_retries=0)
    for _ in range(5):
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices


def test_tokens_per_request_is_checked_and_defaults(limited) -> None:
    key = new_tenant(limited.api, "spark")
    client = openai.OpenAI(base_url=limited.api, api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3000)
    err = exc.value.body
    assert err["code"] == "tokens_per_request_exceeded" and err["param"] == "max_tokens"
    assert err["message"] == ("This request needs 3010 tokens (10 in the prompt + 1 x 3000 "
                              "max_tokens), more than the 2048 tokens per request your plan "
                              "allows. Lower max_tokens to at most 2038.")
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1000, n=3)
    assert "3 x 1000" in exc.value.body["message"]
    # several prompts in one request count together against the cap
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=["a " * 600, "b " * 600], max_tokens=500)
    assert exc.value.body["code"] == "tokens_per_request_exceeded"
    assert "2 x 500" in exc.value.body["message"]


def test_tokens_per_hour_exhausted_then_restored(limited) -> None:
    key = new_tenant(limited.api, "spark", limits={"tokens_per_hour": 120})
    client = openai.OpenAI(base_url=limited.api, api_key=key, max_retries=0)
    first = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon a time",
                                                        max_tokens=10, temperature=0)
    usage = first.parse().usage
    used = usage.total_tokens
    # the reservation was settled to the real usage
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 120 - used
    assert first.headers["x-ratelimit-limit-tokens"] == "120"
    # one token more than what is left is refused, at once (no generation: a loaded machine
    # cannot let the 15 s window roll over before the refusal)
    over = 120 - used - usage.prompt_tokens + 1
    with pytest.raises(openai.RateLimitError) as exc:
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=over)
    err = exc.value.body
    assert err["code"] == "tokens_per_hour_exceeded"
    assert err["message"] == (f"Rate limit reached for tokens per hour: this request may use "
                              f"{120 - used + 1} tokens and {120 - used} of your "
                              f"organization's 120 tokens per hour remain.")
    assert 1 <= err["retry_after"] <= 15
    assert exc.value.response.headers["retry-after"] == str(err["retry_after"])
    time.sleep(err["retry_after"] + 0.5)
    assert client.completions.create(model=MODEL, prompt="Once", max_tokens=5).choices


def test_requests_per_minute_and_headers(limited) -> None:
    key = new_tenant(limited.api, "seed", rate_limit=4)
    client = openai.OpenAI(base_url=limited.api, api_key=key, max_retries=0)
    listed = client.models.with_raw_response.list()  # every request counts, not only inference
    assert listed.headers["x-ratelimit-remaining-requests"] == "3"
    assert listed.headers["X-RateLimit-Limit"] and listed.headers["X-RateLimit-Reset"].isdigit()
    remaining = []
    for _ in range(3):
        c = client.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1)
        remaining.append(int(c.headers["x-ratelimit-remaining-requests"]))
        assert c.headers["x-ratelimit-limit-requests"] == "4"
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as exc:
        client.models.list()
    assert exc.value.body["code"] == "requests_per_minute_exceeded"
    assert exc.value.body["message"] == ("Rate limit reached for requests per minute on this "
                                         "API key: 4 per minute.")
    assert 1 <= exc.value.body["retry_after"] <= 60
    assert exc.value.response.headers["X-RateLimit-Remaining"] == "0"


def test_inference_refused_before_admission_is_still_counted(limited) -> None:
    """An inference request counts at admission (one store call fewer); one that never gets
    there (unknown model, invalid body) is counted when its response starts, with headers."""
    key = new_tenant(limited.api, "seed", rate_limit=3)
    auth = {"Authorization": f"Bearer {key}"}
    unknown = httpx.post(limited.api + "/completions", headers=auth,
                         json={"model": "nope", "prompt": "x", "max_tokens": 1})
    assert unknown.status_code == 404
    assert unknown.headers["x-ratelimit-remaining-requests"] == "2"
    invalid = httpx.post(limited.api + "/chat/completions", headers=auth,
                         json={"model": MODEL, "messages": "not a list"})
    assert invalid.status_code == 400
    assert invalid.headers["x-ratelimit-remaining-requests"] == "1"
    ok = httpx.post(limited.api + "/completions", headers=auth,
                    json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == "0"
    refused = httpx.post(limited.api + "/completions", headers=auth,
                         json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "requests_per_minute_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["retry-after"]


def test_disconnect_and_errors_release_slots(limited) -> None:
    key = new_tenant(limited.api, "spark", limits={"concurrent_requests": 1})
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500, "stream": True}
    for _ in range(3):  # the stream's client goes away after two chunks, three times over
        with httpx.stream("POST", limited.api + "/completions", json=body, headers=auth,
                          timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines), next(lines)
        r = poll(lambda: httpx.post(limited.api + "/completions", headers=auth,
                                    json={"model": MODEL, "prompt": "x", "max_tokens": 1}),
                 lambda r: r.status_code == 200, timeout=5, interval=0.05)
        assert r.status_code == 200
    # a request refused after validation, and one whose model is unknown, hold nothing
    for bad in ({"model": MODEL, "prompt": [1, -1]}, {"model": "nope", "prompt": "x"}):
        assert httpx.post(limited.api + "/completions", headers=auth, json=bad).status_code in (400, 404)
    r = httpx.post(limited.api + "/completions", headers=auth,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200


def test_plan_change_keeps_the_hour(server) -> None:
    """The hour's token count belongs to the organisation, not to its plan: raising the plan
    raises the cap but does not hand out a fresh hour."""
    org, key = make_tenant(server.api, "spark")
    client = openai.OpenAI(base_url=server.api, api_key=key["key"], max_retries=0)
    done = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon a time",
                                                       max_tokens=8, temperature=0)
    used = done.parse().usage.total_tokens
    assert int(done.headers["x-ratelimit-remaining-tokens"]) == 10_000 - used
    r = httpx.patch(f"{server.api}/organizations/{org}", json={"plan": "seed"},
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200
    listed = client.models.with_raw_response.list()
    assert listed.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(listed.headers["x-ratelimit-remaining-tokens"]) == 100_000 - used


def test_tokens_per_hour_is_exact_under_a_burst(server) -> None:
    """A budget that fits exactly six reservations and a burst of 40: exactly six run (check and
    reservation are one step under the limiter's lock). Each request uses all it reserved, so
    no refund makes room for a seventh."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4,
            "logit_bias": {"1": -100, "106": -100, "212": -100}}
    usage = openai.OpenAI(base_url=server.api, api_key=new_tenant(server.api, "seed"),
                          max_retries=0).completions.create(**body).usage
    assert usage.completion_tokens == 4
    estimate = usage.prompt_tokens + 4
    key = new_tenant(server.api, "seed", limits={"tokens_per_hour": 6 * estimate})

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=server.api, timeout=120, limits=limits,
                                     headers={"Authorization": f"Bearer {key}"}) as c:
            return await asyncio.gather(*(c.post("/completions", json=body) for _ in range(40)))

    results = asyncio.run(burst())
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) == 6 and len(refused) == 34, [r.status_code for r in results]
    assert {r.json()["error"]["code"] for r in refused} == {"tokens_per_hour_exceeded"}
