"""The upstream engine against real upstream servers: a second Bastion (the bundled Gemma 3
270M and the tiny vision model) and, where llama-cpp-python's server is installed, that server
on the same GGUF. A fronting Bastion serves them as its own models; everything is checked
through the openai SDK against the front, and compared with what the upstream itself says."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any, Iterator

import httpx
import openai
import pytest

from conftest import (ADMIN_KEY, MODEL, RunningServer, database_rows, free_port, make_tenant,
                      models_cache, noise_image, png_data_uri, start_server, stop_server)
from polling import poll
from test_tools import TIME, WEATHER  # the same two function tools
from tiny_vlm import write_mmproj

VLM = "tiny-vlm"
MSGS = [{"role": "user", "content": "Name three colours."}]


def _has_llama_server() -> bool:
    return subprocess.run([sys.executable, "-c", "import llama_cpp.server"],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The upstream Bastion: the bundled Gemma and the tiny vision model."""
    tmp = tmp_path_factory.mktemp("upstream")
    mmproj = write_mmproj(tmp / "tiny-mmproj.gguf")
    srv = start_server(tmp, "--parallel", "4", "--threads", "1", "--no-worker",
                       "--model", str(models_cache() / "gemma-3-270m-q4_k_m.gguf"),
                       "--mmproj", str(mmproj), "--alias", VLM, embeddings=True)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A second replica of Gemma for failover; the failover test kills it."""
    srv = start_server(tmp_path_factory.mktemp("replica"), "--parallel", "2", "--threads", "1",
                       "--no-worker")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """llama-cpp-python's own OpenAI server on the bundled GGUF, as bench/serving.py starts it."""
    if not _has_llama_server():
        yield None
        return
    port = free_port()
    log = open(tmp_path_factory.mktemp("llama") / "llama-server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model",
         str(models_cache() / "gemma-3-270m-q4_k_m.gguf"), "--host", "127.0.0.1", "--port",
         str(port), "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"

    def up_or_gone() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(base + "/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    poll(up_or_gone, timeout=120, interval=0.3)
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, upstream: RunningServer,
          replica: RunningServer, llama_server: str | None) -> Iterator[RunningServer]:
    key = ADMIN_KEY
    dead = [f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}/v1"]
    specs: list[dict[str, Any]] = [
        {"id": "up-gemma", "urls": [upstream.api], "api_key": key, "model": MODEL,
         "aliases": ["up-g"]},
        {"id": "up-vlm", "urls": [upstream.api], "api_key": key, "model": VLM,
         "capabilities": ["chat", "vision"]},
        {"id": "ha-gemma", "urls": [replica.api, upstream.api], "api_key": key, "model": MODEL,
         "health_interval": 60},
        {"id": "up-minilm", "urls": [upstream.api], "api_key": key, "model": "all-minilm-l6-v2",
         "capabilities": ["embeddings"]},
        {"id": "dead", "urls": dead, "connect_timeout": 1},
        {"id": "wrong-key", "urls": [upstream.api], "api_key": "sk-bst-not-a-key-000000000",
         "model": MODEL}]
    if llama_server:
        specs.append({"id": "lc-gemma", "urls": [llama_server], "model": "gemma"})
    srv = start_server(tmp_path_factory.mktemp("front"), "--no-bundled", "--no-worker",
                       env={"BASTION_UPSTREAMS": json.dumps(specs),
                            "BASTION_FETCH_REMOTE_IMAGES": "true"})
    yield srv
    stop_server(srv)


def sdk(server: RunningServer | str, key: str = ADMIN_KEY) -> openai.OpenAI:
    base = server if isinstance(server, str) else server.api
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)


def streamed(client: openai.OpenAI, **kw: Any) -> tuple[str, Any, list[Any]]:
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage, chunks


# --- text: the same answer and usage as the upstream's own ---------------------------------------
def counts(usage: Any) -> tuple[int, int, int]:
    """Usage without prompt_tokens_details: an upstream's cached tokens are not relayed, and
    the upstream's own answer to a repeated prompt reports them."""
    if not isinstance(usage, dict):
        usage = usage.model_dump()
    return usage["prompt_tokens"], usage.get("completion_tokens"), usage["total_tokens"]


def test_chat_equals_the_upstreams_own_answer(front: RunningServer,
                                              upstream: RunningServer) -> None:
    args: dict[str, Any] = dict(messages=MSGS, max_tokens=16, temperature=0)
    mine = sdk(front).chat.completions.create(model="up-gemma", **args)
    theirs = sdk(upstream).chat.completions.create(model=MODEL, **args)
    assert mine.model == "up-gemma" and mine.id.startswith("chatcmpl-") and mine.id != theirs.id
    assert mine.choices[0].message.content == theirs.choices[0].message.content
    assert mine.choices[0].finish_reason == theirs.choices[0].finish_reason
    assert counts(mine.usage) == counts(theirs.usage)
    via_alias = sdk(front).chat.completions.create(model="up-g", **args)
    assert via_alias.choices[0].message.content == theirs.choices[0].message.content


def test_streaming_equals_non_streaming_and_usage_is_upstreams(front: RunningServer) -> None:
    client = sdk(front)
    args: dict[str, Any] = dict(model="up-gemma", messages=MSGS, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**args)
    text, usage, chunks = streamed(client, stream_options={"include_usage": True}, **args)
    assert text == whole.choices[0].message.content
    assert counts(usage) == counts(whole.usage) and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].model == "up-gemma"
    # not asked for: the usage chunk Bastion forced upstream is not passed on
    text2, _, plain = streamed(client, **args)
    assert text2 == text and all(c.choices for c in plain)
    assert all("usage" not in c.model_dump(exclude_unset=True) for c in plain)


def test_completions_equal_the_upstreams(front: RunningServer, upstream: RunningServer) -> None:
    args: dict[str, Any] = dict(prompt="Once upon a time", max_tokens=12, temperature=0)
    mine = sdk(front).completions.create(model="up-gemma", **args)
    theirs = sdk(upstream).completions.create(model=MODEL, **args)
    assert mine.choices[0].text == theirs.choices[0].text and counts(mine.usage) == counts(theirs.usage)
    chunks = list(sdk(front).completions.create(model="up-gemma", stream=True,
                                                stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == theirs.choices[0].text
    assert counts(chunks[-1].usage) == counts(theirs.usage)


def test_model_card_from_the_upstream(front: RunningServer) -> None:
    cards = {m.id: m.model_extra for m in sdk(front).models.list().data}
    assert cards["up-gemma"]["capabilities"] == ["chat", "completion", "constrained", "tools"]
    assert cards["up-gemma"]["context_length"] == 4096  # read from the upstream's /v1/models
    assert "vision" in cards["up-vlm"]["capabilities"]


# --- the front's ledger and limits ----------------------------------------------------------------
def test_ledger_records_the_upstreams_usage(front: RunningServer) -> None:
    org, key = make_tenant(front.api, "seed", name="ledger")
    r = sdk(front, key["key"]).chat.completions.create(model="up-gemma", messages=MSGS,
                                                        max_tokens=8, temperature=0)
    rows = poll(lambda: [row for row in database_rows(front, "usage_records")
                         if row["org_id"] == org], timeout=10)
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["request_id"], row["model"], row["status"]) == (r.id, "up-gemma", "ok")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (r.usage.prompt_tokens,
                                                                r.usage.completion_tokens)


def test_tokens_per_request_is_the_fronts(front: RunningServer) -> None:
    _, key = make_tenant(front.api, "seed", limits={"tokens_per_request": 300}, name="tpr")
    r = httpx.post(f"{front.api}/chat/completions", headers={"Authorization": f"Bearer {key['key']}"},
                   json={"model": "up-gemma", "messages": MSGS, "max_tokens": 400})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "tokens_per_request_exceeded" and "300 tokens per request" in err["message"]
    assert r.headers["x-ratelimit-limit-tokens"] == "100000"  # the front's seed plan


def test_concurrency_limit_and_disconnect_cancels_upstream(front: RunningServer,
                                                           upstream: RunningServer) -> None:
    org, key = make_tenant(front.api, "seed", limits={"concurrent_requests": 1}, name="conc")
    headers = {"Authorization": f"Bearer {key['key']}"}
    body = {"model": "up-gemma", "messages": MSGS, "max_tokens": 3000, "temperature": 0,
            "stream": True}
    before = len([r for r in database_rows(upstream, "usage_records") if r["status"] == "cancelled"])
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{front.api}/chat/completions",
                                                 headers=headers, json=body) as held:
        assert held.status_code == 200
        lines = held.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        r = httpx.post(f"{front.api}/chat/completions", headers=headers,
                       json={**body, "stream": False, "max_tokens": 4})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert r.headers["retry-after"]
    # the client went away: the front cancels the upstream request (the upstream bills it so)

    def ledgers() -> tuple[list[dict], list[dict]]:
        cancelled = [r for r in database_rows(upstream, "usage_records")
                     if r["status"] == "cancelled"]
        mine = [r for r in database_rows(front, "usage_records") if r["org_id"] == org]
        return cancelled, mine

    cancelled, mine = poll(ledgers, lambda both: len(both[0]) > before and both[1],
                           timeout=15, interval=0.3)
    assert len(cancelled) == before + 1 and cancelled[-1]["completion_tokens"] < 3000
    assert [m["status"] for m in mine] == ["cancelled"]
    # and the slot is free again
    ok = httpx.post(f"{front.api}/chat/completions", headers=headers,
                    json={**body, "stream": False, "max_tokens": 4})
    assert ok.status_code == 200, ok.text


# --- replicas --------------------------------------------------------------------------------------
def test_failover_when_a_replica_dies(front: RunningServer, replica: RunningServer) -> None:
    client = sdk(front)
    args: dict[str, Any] = dict(model="ha-gemma", messages=MSGS, max_tokens=6, temperature=0)
    first = [client.chat.completions.create(**args).choices[0].message.content for _ in range(4)]
    # the ledger writes in batches
    poll(lambda: database_rows(replica, "usage_records"), timeout=10)
    assert database_rows(replica, "usage_records"), "the first replica was never picked"
    replica.proc.send_signal(signal.SIGKILL)
    replica.proc.wait()
    after = [client.chat.completions.create(**args).choices[0].message.content for _ in range(4)]
    assert after == first  # every request answered, by the surviving replica
    text, _, _ = streamed(client, **args)
    assert text == first[0]
    assert "is down" in front.log()


def test_no_replica_up_is_a_503(front: RunningServer) -> None:
    for stream in (False, True):
        r = httpx.post(f"{front.api}/chat/completions",
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       json={"model": "dead", "messages": MSGS, "max_tokens": 4, "stream": stream})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("server_error", "upstream_unavailable")
        assert "dead" in err["message"] and "127.0.0.1" not in err["message"]


def test_upstream_400_is_relayed(front: RunningServer) -> None:
    """The front cannot count Bastion's prompts exactly, so it lets max_tokens through; the
    upstream refuses it and the client gets the upstream's own 400, streamed or not."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            sdk(front).chat.completions.create(model="up-gemma", messages=MSGS, max_tokens=5000,
                                               stream=stream)
        err = info.value.body
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert "maximum context length is 4096" in err["message"]


def test_upstream_refusing_the_key_is_a_502_not_a_401(front: RunningServer) -> None:
    r = httpx.post(f"{front.api}/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   json={"model": "wrong-key", "messages": MSGS, "max_tokens": 4})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_error"
    assert "sk-bst-not-a-key" not in front.log()


# --- vision ----------------------------------------------------------------------------------------
def vision_messages(*urls: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "What is it?"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def test_vision_is_forwarded(front: RunningServer, upstream: RunningServer) -> None:
    """A JPEG goes upstream as the front's decoded pixels in a PNG: the upstream sees the same
    pixels as when it decodes the JPEG itself, so the greedy answer and the usage agree."""
    args: dict[str, Any] = dict(messages=vision_messages(noise_image(1, fmt="JPEG")), max_tokens=6,
                                temperature=0, logprobs=True, top_logprobs=3)
    mine = sdk(front).chat.completions.create(model="up-vlm", **args)
    theirs = sdk(upstream).chat.completions.create(model=VLM, **args)
    assert mine.choices[0].message.content == theirs.choices[0].message.content
    assert counts(mine.usage) == counts(theirs.usage)
    assert [t.top_logprobs for t in mine.choices[0].logprobs.content] == \
        [t.top_logprobs for t in theirs.choices[0].logprobs.content]
    other = sdk(front).chat.completions.create(model="up-vlm", **{
        **args, "messages": vision_messages(noise_image(2, fmt="JPEG"))})
    assert other.choices[0].logprobs.content[0].top_logprobs != \
        mine.choices[0].logprobs.content[0].top_logprobs


def _front_error(front: RunningServer, model: str, url: str) -> dict[str, Any]:
    r = httpx.post(f"{front.api}/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   json={"model": model, "messages": vision_messages(url), "max_tokens": 4})
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_image_checks_happen_at_the_front(front: RunningServer) -> None:
    """The upstream fetches nothing: its own fetching is off, so these codes are the front's."""
    for host in ("127.0.0.1", "169.254.169.254"):
        err = _front_error(front, "up-vlm", f"https://{host}/cat.png")
        assert (err["code"], err["param"]) == ("image_url_forbidden", "messages[0].content[1]")
    bomb = png_data_uri(size=(5000, 5000), color=(0, 0, 0))  # 25 MP > the 16.7 MP limit
    assert _front_error(front, "up-vlm", bomb)["code"] == "image_too_large"
    err = _front_error(front, "up-gemma", png_data_uri())
    assert err["code"] == "model_not_supported" and "does not support image input" in err["message"]


# --- embeddings ------------------------------------------------------------------------------------
def test_embeddings_through_an_upstream(front: RunningServer, upstream: RunningServer) -> None:
    texts = ["A cat sat on the mat.", "Quarterly revenue grew by four percent."]
    theirs = sdk(upstream).embeddings.create(model="all-minilm-l6-v2", input=texts,
                                             encoding_format="float")
    mine = sdk(front).embeddings.create(model="up-minilm", input=texts, encoding_format="float")
    packed = sdk(front).embeddings.create(model="up-minilm", input=texts)  # the SDK's base64
    assert mine.model == "up-minilm" and counts(mine.usage) == counts(theirs.usage)
    for a, b, c in zip(mine.data, theirs.data, packed.data):
        assert a.embedding == b.embedding == c.embedding
    with pytest.raises(openai.BadRequestError) as info:
        sdk(front).chat.completions.create(model="up-minilm", messages=MSGS, max_tokens=4)
    assert "embedding model" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk(front).embeddings.create(model="up-gemma", input="hello")
    assert info.value.body["code"] == "model_not_supported"


# --- llama.cpp's own server ------------------------------------------------------------------------
def test_llama_cpp_server_upstream(front: RunningServer, llama_server: str | None) -> None:
    if llama_server is None:
        pytest.skip("llama_cpp.server is not installed (pip install 'llama-cpp-python[server]')")
    args: dict[str, Any] = dict(messages=MSGS, max_tokens=12, temperature=0)
    mine = sdk(front).chat.completions.create(model="lc-gemma", **args)
    theirs = sdk(llama_server, "none").chat.completions.create(model="gemma", **args)
    assert mine.choices[0].message.content == theirs.choices[0].message.content
    assert counts(mine.usage) == counts(theirs.usage)
    text, usage, chunks = streamed(sdk(front), model="lc-gemma",
                                   stream_options={"include_usage": True}, **args)
    assert text == theirs.choices[0].message.content
    # llama.cpp reports no usage when streaming: the front counts the tokens it relayed
    assert usage.completion_tokens == theirs.usage.completion_tokens
    c_args: dict[str, Any] = dict(prompt="The capital of France is", max_tokens=8, temperature=0)
    mine_c = sdk(front).completions.create(model="lc-gemma", **c_args)
    theirs_c = sdk(llama_server, "none").completions.create(model="gemma", **c_args)
    assert mine_c.choices[0].text == theirs_c.choices[0].text and counts(mine_c.usage) == counts(theirs_c.usage)


def test_websocket_api_serves_an_upstream_model(front: RunningServer,
                                                upstream: RunningServer) -> None:
    from websockets.sync.client import connect

    args: dict[str, Any] = dict(max_tokens=12, temperature=0)
    want = sdk(upstream).chat.completions.create(model=MODEL, messages=MSGS, **args)
    with connect(front.base_url.replace("http://", "ws://") + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "auth", "api_key": ADMIN_KEY}))
        assert json.loads(ws.recv(timeout=30))["type"] == "authenticated"
        ws.send(json.dumps({"type": "inference", "model": "up-gemma", "messages": MSGS,
                            "stream": True, **args}))
        text = ""
        while (m := json.loads(ws.recv(timeout=60)))["type"] == "token":
            text += m["content"]
        ws.send(json.dumps({"type": "inference", "model": "up-gemma", "messages": MSGS,
                            "stream": False, **args}))
        whole = json.loads(ws.recv(timeout=60))
    assert m["type"] == "done", m
    assert text == want.choices[0].message.content
    assert counts(m["usage"]) == counts(want.usage)
    assert whole["type"] == "done" and whole["content"] == text, whole


# --- tools: passed through to the upstream, its calls relayed -----------------------------------
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]
TOOL_ARGS: dict[str, Any] = dict(messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                 tool_choice="required", parallel_tool_calls=False,
                                 temperature=0, max_tokens=80)


def calls_of(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def check_args(calls: list[tuple[str, str]]) -> None:
    import jsonschema

    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), params[name])


def test_tool_calls_are_the_upstreams_own(front: RunningServer,
                                          upstream: RunningServer) -> None:
    """tools, tool_choice and parallel_tool_calls reach the upstream (another Bastion, which
    does tool calling itself): the front's calls and usage are the upstream's, whole and
    streamed (the SDK's stream helper reassembles them), and the ledger bills its usage."""
    org, key = make_tenant(front.api, "seed", name="tool-ledger")
    mine = sdk(front, key["key"]).chat.completions.create(model="up-gemma", **TOOL_ARGS)
    theirs = sdk(upstream).chat.completions.create(model=MODEL, **TOOL_ARGS)
    choice = mine.choices[0]
    assert choice.finish_reason == theirs.choices[0].finish_reason == "tool_calls"
    assert calls_of(choice.message) == calls_of(theirs.choices[0].message)
    check_args(calls_of(choice.message))
    assert all(c.id.startswith("call_") and c.type == "function"
               for c in choice.message.tool_calls)
    assert counts(mine.usage) == counts(theirs.usage)
    rows = poll(lambda: [row for row in database_rows(front, "usage_records")
                         if row["org_id"] == org], timeout=10)
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (mine.usage.prompt_tokens, mine.usage.completion_tokens)]
    with sdk(front).chat.completions.stream(model="up-gemma", **TOOL_ARGS) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert calls_of(final.message) == calls_of(choice.message)
    chunks = list(sdk(front).chat.completions.create(model="up-gemma", stream=True, **TOOL_ARGS))
    deltas = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.id is None for d in deltas[1:])
    named = sdk(front).chat.completions.create(
        model="up-gemma", **{**TOOL_ARGS, "tool_choice": {"type": "function",
                                                          "function": {"name": "get_time"}}})
    assert [n for n, _ in calls_of(named.choices[0].message)] == ["get_time"]


def test_a_tool_round_trip_through_an_upstream(front: RunningServer,
                                               upstream: RunningServer) -> None:
    """The assistant's calls and the tool's result go upstream as sent: the upstream answers
    the front's request exactly as it answers the same history sent to it directly."""
    first = sdk(front).chat.completions.create(model="up-gemma", **TOOL_ARGS)
    message = first.choices[0].message
    history = ASK_WEATHER + [message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": message.tool_calls[0].id,
                              "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    args: dict[str, Any] = dict(messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                temperature=0, max_tokens=24)
    mine = sdk(front).chat.completions.create(model="up-gemma", **args)
    theirs = sdk(upstream).chat.completions.create(model=MODEL, **args)
    assert mine.choices[0].message.content == theirs.choices[0].message.content
    assert mine.choices[0].message.content and not mine.choices[0].message.tool_calls
    assert counts(mine.usage) == counts(theirs.usage)
    plain = sdk(upstream).chat.completions.create(model=MODEL, messages=ASK_WEATHER,
                                                  max_tokens=1)
    assert mine.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the history went up


def test_tools_through_an_upstream_on_the_websocket_and_responses(front: RunningServer) -> None:
    from websockets.sync.client import connect

    with connect(front.base_url.replace("http://", "ws://") + "/v1/ws") as ws:
        ws.send(json.dumps({"type": "auth", "api_key": ADMIN_KEY}))
        assert json.loads(ws.recv(timeout=30))["type"] == "authenticated"
        ws.send(json.dumps({"type": "inference", "model": "up-gemma", "stream": True,
                            **TOOL_ARGS}))
        while (m := json.loads(ws.recv(timeout=60)))["type"] == "token":
            pass
    assert m["type"] == "done" and m["finish_reason"] == "tool_calls", m
    check_args([(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]])
    client = sdk(front)
    tool = {"type": "function", **WEATHER["function"]}
    args: dict[str, Any] = dict(model="up-gemma", input="What is the weather in Paris?",
                                tools=[tool], tool_choice="required", temperature=0,
                                parallel_tool_calls=False, max_output_tokens=80)
    r = client.responses.create(**args)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and r.status == "completed"
    check_args([(c.name, c.arguments) for c in calls])
    events = list(client.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    done = events[-1].response
    assert [(o.name, o.arguments) for o in done.output if o.type == "function_call"] == \
        [(c.name, c.arguments) for c in calls]
