"""Every bad input gets a 4xx with the one pinned error body, naming the parameter."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import MODEL, RunningServer, png_data_uri

USER = [{"role": "user", "content": "Hello"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, **fields}


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None,
                 message: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == code
    assert err["message"]
    if message is not None:
        assert err["message"] == message


CHAT_CASES = [
    (chat(messages=[]), "messages", "invalid_value",
     "Invalid value for 'messages': List should have at least 1 item after validation, not 0."),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "invalid_value",
     "Invalid value for 'messages[0].role': Input should be 'system', 'developer', 'user', "
     "'assistant' or 'tool' (got 'robot')."),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0]", "invalid_value",
     "Invalid value for 'messages[0]': a tool message needs the tool_call_id of the call it "
     "answers."),
    (chat(messages=[{"role": "user"}]), "messages[0]", "invalid_value",
     "Invalid value for 'messages[0]': a user message needs content."),
    (chat(messages="hello"), "messages", "invalid_value",
     "Invalid value for 'messages': Input should be a valid list (got 'hello')."),
    ({"messages": USER}, "model", "missing_required_parameter", "Missing required parameter: 'model'."),
    (chat(temperature=2.5), "temperature", "invalid_value",
     "Invalid value for 'temperature': Input should be less than or equal to 2 (got 2.5)."),
    (chat(temperature="hot"), "temperature", "invalid_value", None),
    (chat(top_p=1.5), "top_p", "invalid_value", None),
    (chat(frequency_penalty=-3), "frequency_penalty", "invalid_value", None),
    (chat(presence_penalty=2.1), "presence_penalty", "invalid_value", None),
    (chat(max_tokens=0), "max_tokens", "invalid_value", None),
    (chat(max_tokens="ten"), "max_tokens", "invalid_value", None),
    (chat(max_completion_tokens=-1), "max_completion_tokens", "invalid_value", None),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value",
     "Invalid value for 'stop': at most 4 stop sequences are allowed, got 5."),
    (chat(stop=["x"] * 5000), "stop", "invalid_value", None),
    (chat(stop=[""]), "stop", "invalid_value", None),
    (chat(n=0), "n", "invalid_value", None),
    (chat(n=9), "n", "invalid_value", "n must be at most 8 on this server (got 9)."),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value", None),
    (chat(top_logprobs=2), "", "invalid_value", None),
    (chat(stream="yes"), "stream", "invalid_value", None),
    (chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage",
     "invalid_value", None),
    (chat(chat_template="{{ 7*7 }}"), "chat_template", "unknown_parameter",
     "Unrecognized request argument supplied: chat_template"),
    (chat(logit_bias={"abc": 1}), "logit_bias", "invalid_value", None),
    (chat(logit_bias={"99999999": 1}), "logit_bias", "invalid_token_id", None),
    (chat(logit_bias={"\u00b2": 1}), "logit_bias", "invalid_value", None),
    (chat(logit_bias={"9" * 5000: 1}), "logit_bias", "invalid_value", None),
    (chat(max_tokens=5000), "max_tokens", "context_length_exceeded",
     "This model's maximum context length is 4096 tokens. However, you requested 5010 tokens "
     "(10 in the messages, 5000 in the completion). Please reduce the messages or the "
     "completion length."),
    (chat(messages=[{"role": "user", "content": "hello " * 5000}]), "messages",
     "context_length_exceeded",
     "This model's maximum context length is 4096 tokens, but the messages are 5010 tokens. "
     "Please shorten the messages."),
    (chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_uri()}}]}]),
     "messages[0].content[0]", "model_not_supported",
     "The model 'gemma-3-270m' does not support image input; send text only, or choose a "
     "vision model."),
    (chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
     "messages[0].content[0]", "unsupported_image_format",
     "messages[0].content[0]: not an image in a supported format (PNG, JPEG, WebP or GIF)."),
    (chat(messages=[{"role": "user", "content": [{"type": "audio", "data": "x"}]}]),
     "messages[0].content[0]", "invalid_value", None),
    (chat(messages=USER * 1025), "messages", "invalid_value", None),
]


@pytest.mark.parametrize("body,param,code,message", CHAT_CASES)
def test_chat_bad_input(http: httpx.Client, body: dict, param: str, code: str,
                        message: str | None) -> None:
    r = http.post("/v1/chat/completions", json=body)
    if param == "":  # top_logprobs without logprobs is a whole-request rule
        assert r.status_code == 400
        assert "top_logprobs requires logprobs" in r.json()["error"]["message"]
        return
    assert_error(r, 400, param, code, message)


COMPLETION_CASES = [
    ({"model": MODEL, "prompt": [1, 2, -5]}, "prompt", "invalid_token_id",
     "Token id -5 in 'prompt' is outside this model's vocabulary (0 to 262143)."),
    ({"model": MODEL, "prompt": [1, 2, 262144]}, "prompt", "invalid_token_id", None),
    ({"model": MODEL, "prompt": [[5, 6], [7, 10**9]]}, "prompt[1]", "invalid_token_id", None),
    ({"model": MODEL, "prompt": []}, "prompt", "invalid_value", None),
    ({"model": MODEL, "prompt": [[]]}, "prompt", "invalid_value", None),
    ({"model": MODEL, "prompt": ["x"] * 65}, "prompt", "invalid_value", None),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter", None),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs", "invalid_value", None),
    ({"model": MODEL, "prompt": [2] * 5000}, "prompt", "context_length_exceeded", None),
]


@pytest.mark.parametrize("body,param,code,message", COMPLETION_CASES)
def test_completion_bad_input(http: httpx.Client, body: dict, param: str, code: str,
                              message: str | None) -> None:
    assert_error(http.post("/v1/completions", json=body), 400, param, code, message)


@pytest.mark.parametrize("raw,code", [
    (b'{"model": "gemma", "messages": [', "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    (b'{"model": "gemma", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_json"),
    (b"[1, 2]", "invalid_body"),
])
def test_malformed_bodies(http: httpx.Client, raw: bytes, code: str) -> None:
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, None, code)


def test_body_over_limit_is_413(http: httpx.Client) -> None:
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 5_000_000}]))
    r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"] == {"message": f"The request body is {len(big)} bytes; the limit "
                                            f"is 4194304 bytes.",
                                 "type": "invalid_request_error", "code": "request_too_large",
                                 "param": None}


def test_chunked_body_over_limit_is_413(http: httpx.Client) -> None:
    def parts():
        for _ in range(5):
            yield b"x" * 1_000_000
    r = http.post("/v1/chat/completions", content=parts(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_url_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nope"), 404, None, "unknown_url")
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_server_survives_everything(http: httpx.Client, server: RunningServer) -> None:
    r = http.post("/v1/chat/completions", json=chat(max_tokens=3))
    assert r.status_code == 200
    assert "Traceback" not in server.log()
