"""A corpus of hostile inputs (issue 15) against a real server: deep nesting, huge and
non-finite numbers, lone surrogates, NUL bytes, 100k messages, 10k stop strings, huge n,
negative limits, wrong types in every field, giant headers, bodies that are not UTF-8 or not
JSON, broken multipart. Every one gets a 4xx with OpenAI's error body, and the server answers
/health after each; a sweep of wrong types through every field of every endpoint may also get
a 200 (a value that happens to be valid) but never a 5xx. The server's log shows no traceback
from these inputs. The server is the bounded one that test_fuzz.py shares (conftest.py)."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import ADMIN_KEY, MODEL, RunningServer

EMBED = "all-minilm-l6-v2"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
DEEP = 10_000


@pytest.fixture
def srv(bounded_server: RunningServer) -> RunningServer:
    """The bounded server (conftest.py), shared with test_fuzz.py: any input that slips
    through to generation makes at most 4 tokens."""
    return bounded_server


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None  # raw bytes, sent as JSON unless headers say otherwise
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    files: Any = None
    data: Any = None
    lenient: bool = False  # the wrong-type sweep: a 200 is fine, a 5xx never


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def deep(levels: int, leaf: str = "1") -> str:
    return "[" * levels + leaf + "]" * levels


def deep_schema(levels: int) -> str:
    """A JSON schema nested `levels` objects deep, as JSON text (too deep for json.dumps)."""
    return ('{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}'
            + "}}" * levels)


def spliced(base: dict[str, Any], marker: str, text: str) -> bytes:
    """json.dumps(base) with the string "<marker>" replaced by raw JSON text."""
    return json.dumps(base).replace(json.dumps(marker), text).encode()


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
EMBEDDING = {"model": EMBED, "input": "hi"}
RESPONSE = {"model": MODEL, "input": "hi", "max_output_tokens": 1, "store": False}
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION,
             "/v1/embeddings": EMBEDDING, "/v1/responses": RESPONSE}
BIG_INT = "1" + "0" * 1000  # 10**1000 as a JSON integer literal
HUGE_INT = "1" + "0" * 5000  # past Python's 4300-digit conversion limit


def with_field(base: dict[str, Any], key: str, literal: str) -> bytes:
    """The body with one field set to a JSON literal written by hand (numbers json.dumps
    cannot write)."""
    text = json.dumps({k: v for k, v in base.items() if k != key})
    return (text[:-1] + f', "{key}": {literal}}}').encode()


def hostile_cases() -> list[Case]:
    cases: list[Case] = []

    def post(name: str, path: str, body: bytes, **kw: Any) -> None:
        cases.append(Case(name, "POST", path, body, **kw))

    for path, base in ENDPOINTS.items():
        ep = path.rsplit("/", 1)[-1]
        post(f"{ep}: 10k-deep JSON array body", path, deep(DEEP).encode())
        post(f"{ep}: 10k-deep nesting in a field", path,
             with_field(base, "model", deep(DEEP, '"x"')))
        post(f"{ep}: 10k-deep object", path, ('{"a":' * DEEP + "1" + "}" * DEEP).encode())
        post(f"{ep}: empty body", path, b"")
        for literal in ("null", "[]", "1", '"text"', "true"):
            post(f"{ep}: body {literal}", path, literal.encode())
        post(f"{ep}: invalid UTF-8", path, b'{"model": "\xff\xfe\xfd", "input": "\xc3\x28"}')
        post(f"{ep}: UTF-16 body", path, raw(base).decode().encode("utf-16"))
        post(f"{ep}: NUL bytes in the JSON text", path, b'{"model": "a\x00b"}')
        post(f"{ep}: truncated JSON", path, raw(base)[:-3])
        post(f"{ep}: trailing garbage", path, raw(base) + b" }}}")
        post(f"{ep}: duplicate keys, last one invalid", path,
             raw(base)[:-1] + b', "model": 5}')
        post(f"{ep}: lone surrogate in model", path, with_field(base, "model", '"\\ud800"'))
        post(f"{ep}: lone low surrogate in model", path, with_field(base, "model", '"x\\udfff"'))
        post(f"{ep}: surrogate as an unknown key", path,
             raw(base)[:-1] + b', "\\ud83d": 1}')
        post(f"{ep}: NUL in model", path, with_field(base, "model", '"\\u0000"'))
        post(f"{ep}: 300 KB model name", path, with_field(base, "model", json.dumps("m" * 300_000)))
        post(f"{ep}: model 1e400", path, with_field(base, "model", "1e400"))
        post(f"{ep}: NaN in user", path, with_field(base, "user", "NaN"))
        post(f"{ep}: unknown argument", path, raw({**base, "frobnicate": True}))
        post(f"{ep}: text/plain content type", path, raw(base),
             headers={**AUTH, "Content-Type": "text/plain"})
        post(f"{ep}: form content type", path, b"model=x&input=y",
             headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
        post(f"{ep}: body over the size limit", path, b'{"model": "' + b"x" * (5 << 20) + b'"}')
        post(f"{ep}: wrong key", path, raw(base),
             headers={"Authorization": "Bearer sk-bst-wrong", "Content-Type": "application/json"})
        post(f"{ep}: giant Authorization header", path, raw(base),
             headers={"Authorization": "Bearer " + "k" * 60_000,
                      "Content-Type": "application/json"})

    sampling = ("/v1/chat/completions", "/v1/completions")
    for path in sampling:
        base = ENDPOINTS[path]
        ep = path.rsplit("/", 1)[-1]
        for key, literal in [("max_tokens", "-1"), ("max_tokens", "0"), ("max_tokens", BIG_INT),
                             ("max_tokens", HUGE_INT), ("max_tokens", "1e400"),
                             ("max_tokens", "1.5"), ("max_tokens", '"5"'),
                             ("temperature", "1e400"), ("temperature", "-1e400"),
                             ("temperature", "NaN"), ("temperature", "Infinity"),
                             ("temperature", "-0.1"), ("top_p", "NaN"), ("top_p", "2"),
                             ("top_k", BIG_INT), ("min_p", "-Infinity"),
                             ("frequency_penalty", "NaN"), ("presence_penalty", "1e400"),
                             ("n", "1000000000"), ("n", BIG_INT), ("n", "-1"), ("n", "0"),
                             ("seed", BIG_INT), ("seed", "-" + BIG_INT), ("seed", "1e400"),
                             ("stop", json.dumps(["s"] * 10_000)), ("stop", json.dumps([""])),
                             ("stop", json.dumps("x" * 100_000)),
                             ("stop", '["\\ud800"]'), ("stop", "[1, 2]"),
                             ("logit_bias", json.dumps({str(i): 1 for i in range(10_000)})),
                             ("logit_bias", '{"1": 1e400}'), ("logit_bias", '{"1": NaN}'),
                             ("logit_bias", '{"abc": 1}'), ("logit_bias", '{"-5": 1}'),
                             ("logit_bias", '{"99999999999": 1}'),
                             ("logit_bias", '{"' + BIG_INT + '": 1}'),
                             ("stream_options", '{"include_usage": "yes"}'),
                             ("user", json.dumps("u" * 100_000))]:
            post(f"{ep}: {key}={literal[:24]}", path, with_field(base, key, literal))
    chat = "/v1/chat/completions"
    post("chat: 100k messages", chat, raw({**CHAT, "messages": [
        {"role": "user", "content": ""}] * 100_000}))
    post("chat: lone surrogate in content", chat, with_field(
        CHAT, "messages", '[{"role": "user", "content": "a\\ud800b"}]'))
    post("chat: unpaired high surrogate at the end", chat, with_field(
        CHAT, "messages", '[{"role": "user", "content": "\\udbff"}]'))
    post("chat: 1000 empty content parts", chat, raw({**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text"}] * 1000}]}))
    post("chat: role NUL", chat, raw({**CHAT, "messages": [{"role": "\u0000", "content": "x"}]}))
    post("chat: no messages", chat, raw({**CHAT, "messages": []}))
    post("chat: a message that is a string", chat, raw({**CHAT, "messages": ["hi"]}))
    post("chat: tool message without id", chat, raw({**CHAT, "messages": [
        {"role": "tool", "content": "x"}]}))
    post("chat: image part with no URL", chat, raw({**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}))
    post("chat: image data URL that is not base64", chat, raw({**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,!!!not-base64!!!"}}]}]}))
    post("chat: image of garbage bytes", chat, raw({**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AAAAAAAAAAAA"}}]}]}))
    post("chat: file:// image", chat, raw({**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "file:///etc/passwd"}}]}]}))
    post("chat: response_format schema 450 deep", chat, spliced({**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "@S"}}}, "@S",
        deep_schema(450)))
    post("chat: response_format schema that is not a schema", chat, raw({**CHAT,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "no-such-type", "$ref": "#/nowhere"}}}}))
    post("chat: response_format recursive $ref", chat, raw({**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}}}))
    post("chat: regex pattern bomb", chat, raw({**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "pattern": "(a|" * 2000 + "b" + ")" * 2000}}}}))
    post("chat: tool parameters 450 deep", chat, spliced({**CHAT, "tools": [{
        "type": "function", "function": {"name": "f", "parameters": "@S"}}]}, "@S",
        deep_schema(450)))
    post("chat: 10k tools", chat, raw({**CHAT, "tools": [{
        "type": "function", "function": {"name": f"f{i}"}} for i in range(10_000)]}))
    post("chat: tool_choice naming no tool", chat, raw({**CHAT, "tools": [{
        "type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}))
    post("chat: top_logprobs without logprobs", chat, raw({**CHAT, "top_logprobs": 5}))
    post("chat: top_logprobs 10**1000", chat, with_field({**CHAT, "logprobs": True},
                                                          "top_logprobs", BIG_INT))
    post("chat: max_completion_tokens -1", chat, raw({**CHAT, "max_completion_tokens": -1}))
    post("chat: max_tokens over the context", chat, raw({**CHAT, "max_tokens": 10_000_000}))
    post("chat: metadata of non-strings", chat, raw({**CHAT, "metadata": {"a": {"b": 1}}}))
    comp = "/v1/completions"
    post("completions: token ids 10**1000", comp, with_field(COMPLETION, "prompt", f"[{BIG_INT}]"))
    post("completions: negative token id", comp, raw({**COMPLETION, "prompt": [-1]}))
    post("completions: token id past the vocabulary", comp,
         raw({**COMPLETION, "prompt": [2**31 - 1]}))
    post("completions: token id 2**40", comp, raw({**COMPLETION, "prompt": [2**40]}))
    post("completions: 100k prompts", comp, raw({**COMPLETION, "prompt": ["a"] * 100_000}))
    post("completions: empty prompt list", comp, raw({**COMPLETION, "prompt": []}))
    post("completions: prompt of empty token lists", comp, raw({**COMPLETION, "prompt": [[]]}))
    post("completions: mixed prompt list", comp, raw({**COMPLETION, "prompt": ["a", [1], None]}))
    post("completions: lone surrogate in prompt", comp,
         with_field(COMPLETION, "prompt", '"\\ud800"'))
    post("completions: lone surrogate in suffix", comp,
         with_field(COMPLETION, "suffix", '"\\udc00"'))
    post("completions: logprobs 10**1000", comp, with_field(COMPLETION, "logprobs", BIG_INT))
    post("completions: best_of 10**9", comp, raw({**COMPLETION, "best_of": 10**9}))
    post("completions: best_of below n", comp, raw({**COMPLETION, "best_of": 1, "n": 2}))
    post("completions: echo with suffix", comp, raw({**COMPLETION, "echo": True, "suffix": "x"}))
    post("completions: n x prompts over the batch", comp,
         raw({**COMPLETION, "prompt": ["a"] * 64, "n": 128}))
    emb = "/v1/embeddings"
    post("embeddings: empty string", emb, raw({**EMBEDDING, "input": ""}))
    post("embeddings: empty list", emb, raw({**EMBEDDING, "input": []}))
    post("embeddings: list of empty lists", emb, raw({**EMBEDDING, "input": [[]]}))
    post("embeddings: token id 10**1000", emb, with_field(EMBEDDING, "input", f"[{BIG_INT}]"))
    post("embeddings: negative token ids", emb, raw({**EMBEDDING, "input": [[-1, -2]]}))
    post("embeddings: token id past the vocabulary", emb, raw({**EMBEDDING, "input": [2**31 - 1]}))
    post("embeddings: 100k inputs", emb, raw({**EMBEDDING, "input": ["a"] * 100_000}))
    post("embeddings: mixed input list", emb, raw({**EMBEDDING, "input": ["a", 1]}))
    post("embeddings: lone surrogate in input", emb, with_field(EMBEDDING, "input", '"\\ud800"'))
    post("embeddings: dimensions -1", emb, raw({**EMBEDDING, "dimensions": -1}))
    post("embeddings: dimensions 10**1000", emb, with_field(EMBEDDING, "dimensions", BIG_INT))
    post("embeddings: dimensions 7", emb, raw({**EMBEDDING, "dimensions": 7}))
    post("embeddings: encoding_format bogus", emb, raw({**EMBEDDING, "encoding_format": "hex"}))
    post("embeddings: chat model token ids 10**1000", emb,
         with_field({**EMBEDDING, "model": MODEL}, "input", f"[[{BIG_INT}]]"))
    post("embeddings: chat model negative token ids", emb,
         raw({**EMBEDDING, "model": MODEL, "input": [[-7]]}))
    resp = "/v1/responses"
    post("responses: max_output_tokens -1", resp, raw({**RESPONSE, "max_output_tokens": -1}))
    post("responses: max_output_tokens 10**1000", resp,
         with_field(RESPONSE, "max_output_tokens", BIG_INT))
    post("responses: 100k input items", resp, raw({**RESPONSE, "input": [
        {"role": "user", "content": "a"}] * 100_000}))
    post("responses: lone surrogate in instructions", resp,
         with_field(RESPONSE, "instructions", '"\\ud800"'))
    post("responses: lone surrogate in an input item", resp, with_field(
        RESPONSE, "input", '[{"role": "user", "content": [{"type": "input_text", '
                           '"text": "\\udfff"}]}]'))
    post("responses: unknown item type", resp, raw({**RESPONSE, "input": [{"type": "bogus"}]}))
    post("responses: previous_response_id garbage", resp,
         raw({**RESPONSE, "previous_response_id": "../../etc/passwd"}))
    post("responses: previous_response_id 100 KB", resp,
         raw({**RESPONSE, "previous_response_id": "r" * 100_000}))
    post("responses: temperature NaN", resp, with_field(RESPONSE, "temperature", "NaN"))
    post("responses: text format schema 450 deep", resp, spliced({**RESPONSE, "text": {
        "format": {"type": "json_schema", "name": "x", "schema": "@S"}}}, "@S",
        deep_schema(450)))
    post("responses: built-in tool", resp, raw({**RESPONSE, "tools": [{"type": "web_search"}]}))
    post("responses: background mode", resp, raw({**RESPONSE, "background": True}))

    # files: multipart that is broken, hostile names, hostile JSONL
    files = "/v1/files"
    line = raw({"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}]})
    for name, kw in [
        ("no body", {"body": b"", "headers": {**AUTH, "Content-Type": "multipart/form-data"}}),
        ("multipart without a boundary", {"body": b"--x\r\n\r\n--x--\r\n", "headers": {
            **AUTH, "Content-Type": "multipart/form-data"}}),
        ("garbage multipart", {"body": b"\x00\xff" * 5000, "headers": {
            **AUTH, "Content-Type": "multipart/form-data; boundary=zzz"}}),
        ("JSON instead of multipart", {"body": raw({"purpose": "fine-tune"}), "headers": JSON}),
        ("no file part", {"files": None, "data": {"purpose": "fine-tune"}}),
        ("no purpose", {"files": {"file": ("a.jsonl", line + b"\n")}}),
        ("unknown purpose", {"files": {"file": ("a.jsonl", line + b"\n")},
                             "data": {"purpose": "\u0000evil"}}),
        ("empty file", {"files": {"file": ("a.jsonl", b"")}, "data": {"purpose": "fine-tune"}}),
        ("JSONL 10k deep", {"files": {"file": ("a.jsonl", deep(DEEP).encode() + b"\n")},
                            "data": {"purpose": "fine-tune"}}),
        ("JSONL with a lone surrogate", {"files": {"file": (
            "a.jsonl", b'{"messages": [{"role": "user", "content": "\\ud800"}, '
                       b'{"role": "assistant", "content": "b"}]}\n')},
            "data": {"purpose": "fine-tune"}}),
        ("JSONL of invalid UTF-8", {"files": {"file": ("a.jsonl", b"\xff\xfe" * 100 + b"\n")},
                                    "data": {"purpose": "fine-tune"}}),
        ("JSONL with NaN and 1e400", {"files": {"file": (
            "a.jsonl", b'{"messages": NaN, "x": 1e400}\n')}, "data": {"purpose": "fine-tune"}}),
        ("JSONL with a 10**1000 integer", {"files": {"file": (
            "a.jsonl", b'{"messages": ' + HUGE_INT.encode() + b"}\n")},
            "data": {"purpose": "fine-tune"}}),
        ("filename with NUL and a path", {"files": {"file": (
            "../../\u0000etc/passwd.jsonl", b"not json\n")}, "data": {"purpose": "fine-tune"}}),
        ("filename of 100 KB", {"files": {"file": ("f" * 100_000 + ".jsonl", b"x\n")},
                                "data": {"purpose": "fine-tune"}}),
        ("two file parts", {"files": [("file", ("a.jsonl", b"x\n")), ("file", ("b.jsonl", b"y\n"))],
                            "data": {"purpose": "fine-tune"}}),
    ]:
        body = kw.pop("body", None)
        headers = kw.pop("headers", dict(AUTH))
        files_arg = kw.pop("files", None)
        if name == "no file part":
            files_arg = {"other": ("x.txt", b"x")}
        cases.append(Case(f"files: {name}", "POST", files, body, headers=headers,
                          files=files_arg, data=kw.pop("data", None)))
    for path in ("/v1/files?limit=" + BIG_INT, "/v1/files?limit=-1", "/v1/files?order=sideways",
                 "/v1/files?after=%00", "/v1/files?purpose=%ED%A0%80",
                 "/v1/files/%00", "/v1/files/%ff%fe/content", "/v1/files/" + "f" * 10_000,
                 "/v1/models/%ED%A0%80", "/v1/models/" + "m" * 10_000, "/v1/models/%00",
                 "/v1/responses/%00", "/v1/responses/..%2F..%2Fetc%2Fpasswd/input_items",
                 "/v1/responses/x/input_items?limit=" + BIG_INT):
        # a filter that matches nothing may be a 200 with an empty list: never a 5xx
        cases.append(Case(f"GET {path[:60]}", "GET", path, headers=dict(AUTH), lenient=True))
    return cases


WRONG_TYPES: list[Any] = [None, True, -1, 1.5, "x", [], {"a": None}, [[1]]]
FIELDS = {
    "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens",
                             "temperature", "top_p", "top_k", "min_p", "n", "stream", "stop",
                             "stream_options", "presence_penalty", "frequency_penalty", "seed",
                             "logit_bias", "logprobs", "top_logprobs", "response_format",
                             "tools", "tool_choice", "parallel_tool_calls", "user", "metadata",
                             "store"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream",
                        "stop", "seed", "logit_bias", "logprobs", "echo", "suffix", "best_of",
                        "response_format", "user"],
    "/v1/embeddings": ["model", "input", "encoding_format", "dimensions", "user", "truncate"],
    "/v1/responses": ["model", "input", "instructions", "max_output_tokens", "temperature",
                      "top_p", "stream", "store", "previous_response_id", "tools",
                      "tool_choice", "text", "metadata", "user"],
}
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id"]


def sweep_cases() -> list[Case]:
    """Every field of every endpoint set to each wrong type in turn (the other fields valid,
    the model one that does not exist, so that nothing generates: the request's validation is
    what is swept; the hostile cases above reach the models): a value may happen to be valid
    (then a 404 for the model), but nothing may be a 5xx."""
    cases = []
    for path, fields in FIELDS.items():
        base = {**ENDPOINTS[path], "model": "no-such-model"}
        for key in fields:
            for value in WRONG_TYPES:
                body = {**base, key: value}
                if key == "stream" and value is True:
                    continue  # a valid stream: covered by the streaming tests
                cases.append(Case(f"sweep {path} {key}={value!r}", "POST", path, raw(body),
                                  lenient=True))
    for key in MESSAGE_FIELDS:
        for value in WRONG_TYPES:
            msg = {"role": "user", "content": "hi", key: value}
            cases.append(Case(f"sweep chat messages[0].{key}={value!r}", "POST",
                              "/v1/chat/completions",
                              raw({**CHAT, "model": "no-such-model", "messages": [msg]}),
                              lenient=True))
    return cases


def error_shape(r: httpx.Response) -> str | None:
    """What is wrong with an error response, or None."""
    try:
        body = r.json()
    except ValueError:
        return f"not JSON: {r.text[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "code", "param"}:
        return f"not OpenAI's error body: {r.text[:200]!r}"
    if not isinstance(err["message"], str) or not err["message"]:
        return "an empty message"
    return None


def send(client: httpx.Client, case: Case) -> httpx.Response:
    if case.files is not None or case.data is not None:
        return client.request(case.method, case.path, headers=case.headers, files=case.files,
                              data=case.data)
    return client.request(case.method, case.path, content=case.body, headers=case.headers)


def raw_request(srv: RunningServer, head: bytes, body: bytes = b"") -> bytes:
    """A request written byte by byte on a socket (what httpx refuses to send)."""
    url = urlsplit(srv.base_url)
    chunks = []
    with socket.create_connection((url.hostname, url.port), timeout=60) as s:
        try:
            s.sendall(head + body)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before reading it all
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


def raw_cases(srv: RunningServer) -> list[tuple[str, bytes]]:
    host = urlsplit(srv.base_url).netloc.encode()
    body = raw(CHAT)
    start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host + b"\r\n"
    auth = b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\n"
    tail = b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
    return [
        ("NUL in a header", start + auth + b"X-Evil: a\x00b\r\n" + tail + b"\r\n\r\n" + body),
        ("1 MB header", start + auth + b"X-Big: " + b"h" * 1_000_000 + b"\r\n" + tail
         + b"\r\n\r\n" + body),
        ("10k headers", start + auth + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
         + tail + b"\r\n\r\n" + body),
        ("invalid UTF-8 in a header", start + auth + b"X-Bad: \xff\xfe\r\n" + tail
         + b"\r\n\r\n" + body),
        ("non-ASCII API key", start + b"Authorization: Bearer sk-bst-\xc3\xa9\xed\xa0\x80\r\n"
         + tail + b"\r\n\r\n" + body),
        ("Content-Length not a number", start + auth
         + b"Content-Type: application/json\r\nContent-Length: 12abc\r\n\r\n" + body),
        ("Content-Length larger than the body", start + auth
         + b"Content-Type: application/json\r\nContent-Length: 999\r\n\r\n" + body),
        ("negative Content-Length", start + auth
         + b"Content-Type: application/json\r\nContent-Length: -5\r\n\r\n" + body),
        ("two Content-Lengths", start + auth + tail + b"\r\nContent-Length: 3\r\n\r\n" + body),
        ("chunked body over the limit", start + auth
         + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"".join(b"100000\r\n" + b"x" * 0x100000 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"),
        ("bad chunk size", start + auth
         + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),
        ("path with invalid UTF-8", b"GET /v1/models/\xff\xfe HTTP/1.1\r\nHost: " + host
         + b"\r\n" + auth + b"\r\n"),
    ]


def healthy(client: httpx.Client) -> bool:
    for _ in range(3):
        try:
            if client.get("/health", timeout=30).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(1)
    return False


@pytest.mark.timeout(900)  # about 2 minutes on a quiet 2-core machine; far more on a busy one
def test_hostile_inputs_get_4xx_and_the_server_stays_up(srv: RunningServer) -> None:
    cases = hostile_cases() + sweep_cases()
    log_start = len(srv.log())  # the shared server's log: only what these inputs caused
    failures: list[str] = []
    tried = 0
    with httpx.Client(base_url=srv.base_url, timeout=120) as client:
        for case in cases:
            tried += 1
            try:
                r = send(client, case)
            except httpx.HTTPError as exc:
                failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
                r = None
            if r is not None:
                if case.lenient and r.status_code == 200:
                    pass
                elif not 400 <= r.status_code < 500:
                    failures.append(f"{case.name}: HTTP {r.status_code} {r.text[:300]!r}")
                elif (problem := error_shape(r)) is not None:
                    failures.append(f"{case.name}: HTTP {r.status_code}, {problem}")
            if not healthy(client):
                failures.append(f"{case.name}: the server stopped answering /health")
                break
        for name, request in raw_cases(srv):
            tried += 1
            answer = raw_request(srv, request)
            status = answer.split(b"\r\n", 1)[0]
            if answer and not (status.startswith(b"HTTP/1.1 4")):
                failures.append(f"raw {name}: {status[:80]!r}")
            elif answer and b'"error"' not in answer and b"HTTP/1.1 4" in status:
                failures.append(f"raw {name}: not OpenAI's error body: {answer[:300]!r}")
            if not healthy(client):
                failures.append(f"raw {name}: the server stopped answering /health")
                break
    print(f"\nhostile inputs tried: {tried} ({len(cases)} HTTP, {tried - len(cases)} raw)")
    log = srv.log()[log_start:]
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-4000:]
    assert not failures, f"{len(failures)} of {tried} inputs:\n" + "\n".join(failures)
