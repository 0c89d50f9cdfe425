"""The engine error family through the real server: each kind of engine error reaches the
client as its own HTTP error (errors.py's one table), streamed or not. The upstream Bastion of
test_upstream.py serves the local models (llama.cpp, and a tiny PyTorch upload whose chat
template refuses system messages) and is the upstream of a small front."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import ADMIN_KEY, MODEL, RunningServer, free_port, start_server, stop_server
from test_custom_models import form, upload
from test_upstream import upstream  # noqa: F401  (the fixture: the upstream Bastion)
from tiny_llama import build_tiny_llama

from bastion.engines.base import (EngineError, ModelFailure, ModelInputError, ModelUnavailable,
                                  UpstreamFailure, UpstreamRefused)
from bastion.errors import engine_api_error

MSGS = [{"role": "user", "content": "hello world"}]
REFUSING = ("{% for m in messages %}"
            "{% if m.role == 'system' %}{{ raise_exception('System messages are not "
            "supported by this model.') }}{% endif %}"
            "<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def refusing_model(tmp_path_factory: pytest.TempPathFactory, upstream: RunningServer  # noqa: F811
                   ) -> str:
    """A tiny Llama uploaded to the upstream Bastion (served by the PyTorch engine), its chat
    template raising on a system message."""
    from transformers import AutoTokenizer

    out = build_tiny_llama(tmp_path_factory.mktemp("refusing"))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = REFUSING
    tok.save_pretrained(out)
    r = upload(upstream, ADMIN_KEY, "no-system", form(out, "no-system"))
    assert r.status_code == 200, r.text
    return "no-system"


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, upstream: RunningServer  # noqa: F811
          ) -> Iterator[RunningServer]:
    specs: list[dict[str, Any]] = [
        {"id": "up-gemma", "urls": [upstream.api], "api_key": ADMIN_KEY, "model": MODEL},
        {"id": "up-missing", "urls": [upstream.api], "api_key": ADMIN_KEY,
         "model": "no-such-model"},
        {"id": "dead", "urls": [f"http://127.0.0.1:{free_port()}/v1"], "connect_timeout": 1},
        {"id": "wrong-key", "urls": [upstream.api], "api_key": "sk-bst-not-a-key-000000000",
         "model": MODEL}]
    srv = start_server(tmp_path_factory.mktemp("front"), "--no-bundled", "--no-worker",
                       env={"BASTION_UPSTREAMS": json.dumps(specs)})
    yield srv
    stop_server(srv)


def post(server: RunningServer, path: str, body: dict[str, Any]) -> list[httpx.Response]:
    """The same request streamed and not: an engine error found before the first byte is an
    HTTP error either way."""
    return [httpx.post(f"{server.api}/{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       json={**body, "stream": stream}, timeout=120)
            for stream in (False, True)]


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_template_refusal_on_pytorch_is_a_400(upstream: RunningServer,  # noqa: F811
                                              refusing_model: str) -> None:
    ok = httpx.post(f"{upstream.api}/chat/completions",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                    json={"model": refusing_model, "messages": MSGS, "max_tokens": 3})
    assert ok.status_code == 200, ok.text
    for r in post(upstream, "chat/completions", {
            "model": refusing_model, "max_tokens": 3,
            "messages": [{"role": "system", "content": "Be brief."}, *MSGS]}):
        err = error_of(r, 400)
        assert (err["type"], err["code"], err["param"]) == ("invalid_request_error",
                                                            "invalid_messages", "messages")
        assert "System messages are not supported by this model." in err["message"]


def test_llamacpp_input_error_is_a_400(upstream: RunningServer) -> None:  # noqa: F811
    for r in post(upstream, "completions", {"model": MODEL, "prompt": [2, 10_000_000],
                                            "max_tokens": 3}):
        err = error_of(r, 400)
        assert (err["type"], err["code"], err["param"]) == ("invalid_request_error",
                                                            "invalid_token_id", "prompt")
        assert "10000000" in err["message"]


def test_no_upstream_replica_is_a_503(front: RunningServer) -> None:
    for r in post(front, "chat/completions", {"model": "dead", "messages": MSGS,
                                              "max_tokens": 3}):
        err = error_of(r, 503)
        assert (err["type"], err["code"]) == ("server_error", "upstream_unavailable")


def test_upstream_4xx_is_relayed_with_its_status(front: RunningServer) -> None:
    """The upstream does not know the model it is asked for: its 404, not Bastion's 500."""
    for r in post(front, "chat/completions", {"model": "up-missing", "messages": MSGS,
                                              "max_tokens": 3}):
        err = error_of(r, 404)
        assert (err["type"], err["code"]) == ("invalid_request_error", "model_not_found")
        assert "no-such-model" in err["message"]


def test_upstream_refusing_the_key_is_a_502(front: RunningServer) -> None:
    for r in post(front, "completions", {"model": "wrong-key", "prompt": "Hi",
                                         "max_tokens": 3}):
        err = error_of(r, 502)
        assert (err["type"], err["code"]) == ("server_error", "upstream_error")


def test_one_table_maps_every_engine_error() -> None:
    """What each class becomes (a model failing mid-run has no cheap real trigger)."""
    cases: list[tuple[EngineError, int, str, str | None]] = [
        (ModelInputError("bad", code="invalid_value", param="x"), 400, "invalid_request_error",
         "invalid_value"),
        (ModelUnavailable("later"), 503, "server_error", "service_unavailable"),
        (ModelFailure("broke"), 500, "model_error", None),
        (EngineError("broke"), 500, "model_error", None),
        (UpstreamRefused("nope", status=422), 422, "invalid_request_error", None),
        (UpstreamFailure("gateway"), 502, "server_error", "upstream_error")]
    for exc, status, kind, code in cases:
        api = engine_api_error(exc)
        body = api.body()["error"]
        assert (api.status, body["type"], body["code"]) == (status, kind, code), exc
        assert body["message"] == exc.message
    assert engine_api_error(cases[0][0]).param == "x"


def test_no_engine_class_checks_outside_engines() -> None:
    """Nothing outside engines/ tells engines apart by class (EngineError is not an engine)."""
    src = Path(__file__).resolve().parents[1] / "src" / "bastion"
    offenders = [f"{p}:{i}" for p in src.rglob("*.py") if "engines" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"isinstance\(.*Engine\b", line) or "is_passthrough" in line]
    assert offenders == []
