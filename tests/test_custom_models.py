"""Custom model upload (POST /v1/models, the spec's multipart form), serving and delete.

A tiny Llama is built from a config here (random weights, a word-level tokenizer with a chat
template), uploaded exactly as the spec's curl does, and its answers through the real server
are compared with transformers' own greedy generation of the same weights."""

from __future__ import annotations

import http.client
import io
import json
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, RunningServer, make_tenant, models_cache, start_server, stop_server
from ftdata import duck_examples, write_jsonl
from tiny_llama import build_tiny_llama

LIMIT = 300 * 1024 * 1024  # holds the bundled GGUF (253 MB), refuses more


def form(directory: Path, model_id: str, *, weights: bytes | None = None,
         config: bytes | None = None, tokenizer: bool = True) -> dict:
    files = {"file": ("model.safetensors",
                      weights if weights is not None else (directory / "model.safetensors").read_bytes()),
             "config": ("config.json",
                        config if config is not None else (directory / "config.json").read_bytes())}
    if tokenizer:
        files["tokenizer"] = ("tokenizer.json", (directory / "tokenizer.json").read_bytes())
        files["tokenizer_config"] = ("tokenizer_config.json",
                                     (directory / "tokenizer_config.json").read_bytes())
        if (directory / "chat_template.jinja").exists():  # where transformers 5 keeps it
            files["chat_template"] = ("chat_template.jinja",
                                      (directory / "chat_template.jinja").read_bytes())
    return files


def upload(srv: RunningServer, key: str, model_id: str, files: dict,
           model_type: str = "causal-lm") -> httpx.Response:
    return httpx.post(f"{srv.api}/models", headers={"Authorization": f"Bearer {key}"},
                      data={"model_id": model_id, "model_type": model_type}, files=files,
                      timeout=300)


def greedy(directory: Path, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of the same weights: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=2, pad_token_id=2)
    ids = out[0, len(prompt_ids):].tolist()
    return ids[:ids.index(2)] if 2 in ids else ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("uploads"), "--parallel", "2", "--no-worker",
                     env={"BASTION_MAX_MODEL_BYTES": str(LIMIT)})
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def tenant(srv: RunningServer) -> dict:
    org, key = make_tenant(srv.api, "scale", permissions=("inference", "models", "training"),
                           name="uploader")
    return {**key, "org": org}


@pytest.fixture(scope="module")
def uploaded(srv: RunningServer, tenant: dict, tiny: Path) -> dict:
    r = upload(srv, tenant["key"], "custom-model", form(tiny, "custom-model"))
    assert r.status_code == 200, r.text
    return r.json()


def sdk(srv: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.api, api_key=key, max_retries=0, timeout=120)


def test_upload_is_listed_for_its_organisation_only(srv, tenant, uploaded, tiny) -> None:
    assert uploaded["id"] == "custom-model"
    assert uploaded["object"] == "model"
    assert uploaded["owned_by"] == tenant["org"]
    assert uploaded["context_length"] == 256
    assert set(uploaded["capabilities"]) == {"chat", "completion"}
    client = sdk(srv, tenant["key"])
    assert "custom-model" in [m.id for m in client.models.list()]
    assert client.models.retrieve("custom-model").context_length == 256
    _, other = make_tenant(srv.api, "scale", permissions=("inference", "models"), name="other")
    stranger = sdk(srv, other["key"])
    assert "custom-model" not in [m.id for m in stranger.models.list()]
    with pytest.raises(openai.NotFoundError):
        stranger.models.retrieve("custom-model")
    with pytest.raises(openai.NotFoundError):
        stranger.chat.completions.create(model="custom-model", max_tokens=3,
                                         messages=[{"role": "user", "content": "hello"}])
    # the other organisation may give its own model the same name; each sees its own
    r = upload(srv, other["key"], "custom-model", form(tiny, "custom-model"))
    assert r.status_code == 200, r.text
    assert r.json()["owned_by"] != tenant["org"]
    assert client.models.retrieve("custom-model").owned_by == tenant["org"]


def test_chat_matches_transformers_greedy(srv, tenant, uploaded, tiny) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    messages = [{"role": "user", "content": "hello world alpha bravo"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    expected = greedy(tiny, list(prompt), 12)
    assert len(expected) >= 3, expected
    client = sdk(srv, tenant["key"])
    r = client.chat.completions.create(model="custom-model", messages=messages, max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(expected)
    assert r.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    stream = client.chat.completions.create(model="custom-model", messages=messages,
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == len(expected)


def test_completions_and_sampling(srv, tenant, uploaded, tiny) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok("the world is", add_special_tokens=True)["input_ids"]
    expected = greedy(tiny, ids, 8)
    client = sdk(srv, tenant["key"])
    r = client.completions.create(model="custom-model", prompt="the world is", max_tokens=8,
                                  temperature=0)
    assert r.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids)
    seeded = [client.completions.create(model="custom-model", prompt="hello", max_tokens=8,
                                        temperature=1.0, seed=11).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    first = expected and tok.decode(expected[:1])
    if first:  # a stop sequence cuts the text before it
        cut = client.completions.create(model="custom-model", prompt="the world is",
                                        max_tokens=8, temperature=0, stop=[first])
        assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "stop"


def test_bad_uploads_are_refused_and_leave_nothing(srv, tenant, tiny, tmp_path) -> None:
    import torch

    key = tenant["key"]
    weights = (tiny / "model.safetensors").read_bytes()
    config = json.loads((tiny / "config.json").read_text())
    before = sorted(p.name for p in (srv.data_dir / "uploaded_models").rglob("*")
                    if ".partial" not in p.parts)

    def refused(files: dict, status: int, *needles: str, model_id: str = "bad-one",
                model_type: str = "causal-lm") -> dict:
        r = upload(srv, key, model_id, files, model_type)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        for needle in needles:
            assert needle in err["message"], err
        return err

    pickled = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, pickled)
    err = refused(form(tiny, "x", weights=pickled.getvalue()), 400, "pickle")
    assert err["code"] == "unsupported_model_format" and err["param"] == "file"
    refused(form(tiny, "x", weights=weights[:-100]), 400, "truncated", "bytes")
    refused(form(tiny, "x", weights=weights[:5]), 400, "truncated")
    refused(form(tiny, "x", weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"), 400,
            "not valid JSON")
    wrong = {**config, "hidden_size": 48}
    err = refused(form(tiny, "x", config=json.dumps(wrong).encode()), 400, "shape",
                  "config.json implies")
    assert err["code"] == "config_mismatch"
    deeper = {**config, "num_hidden_layers": 3}
    refused(form(tiny, "x", config=json.dumps(deeper).encode()), 400, "model.layers.2")
    remote = {**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    refused(form(tiny, "x", config=json.dumps(remote).encode()), 400, "trust_remote_code")
    alien = {**config, "model_type": "not-a-model"}
    refused(form(tiny, "x", config=json.dumps(alien).encode()), 400, "not-a-model")
    refused(form(tiny, "x", config=b"{oops"), 400, "config.json is not valid JSON")
    refused(form(tiny, "x", tokenizer=False), 400, "tokenizer")
    refused(form(tiny, "x"), 400, "model_type", model_type="seq2seq")
    refused(form(tiny, "x"), 400, "model_id", model_id="../escape")
    refused(form(tiny, "x"), 409, "already exists", model_id="gemma-3-270m")
    after = sorted(p.name for p in (srv.data_dir / "uploaded_models").rglob("*")
                   if ".partial" not in p.parts)
    assert after == before
    assert not list((srv.data_dir / "uploaded_models" / ".partial").glob("*"))
    assert "bad-one" not in [m.id for m in sdk(srv, key).models.list()]


def test_upload_over_the_limit_is_413(srv, tenant) -> None:
    url = urlparse(srv.api)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/v1/models")
    conn.putheader("Authorization", f"Bearer {tenant['key']}")
    conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
    conn.putheader("Content-Length", str(LIMIT + 1))
    conn.endheaders()
    conn.send(b"--xyz\r\n")
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 413, body
    assert str(LIMIT) in body["error"]["message"]


def test_permissions(srv, tiny) -> None:
    _, reader = make_tenant(srv.api, "scale", permissions=("inference",), name="reader")
    r = upload(srv, reader["key"], "nope", form(tiny, "nope"))
    assert r.status_code == 403 and "models" in r.json()["error"]["message"]
    r = httpx.delete(f"{srv.api}/models/gemma-3-270m",
                     headers={"Authorization": f"Bearer {reader['key']}"})
    assert r.status_code == 403


def test_duplicate_id_is_409(srv, tenant, uploaded, tiny) -> None:
    r = upload(srv, tenant["key"], "custom-model", form(tiny, "custom-model"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_exists"


def test_delete(srv, tenant, tiny) -> None:
    key = tenant["key"]
    assert upload(srv, key, "short-lived", form(tiny, "short-lived")).status_code == 200
    client = sdk(srv, key)
    assert client.completions.create(model="short-lived", prompt="hello", max_tokens=2).usage
    dirs = set((srv.data_dir / "uploaded_models").glob("org-*/mdl-*"))
    _, other = make_tenant(srv.api, "scale", permissions=("models",), name="thief")
    r = httpx.delete(f"{srv.api}/models/short-lived",
                     headers={"Authorization": f"Bearer {other['key']}"})
    assert r.status_code == 404
    gone = client.models.delete("short-lived")
    assert gone.id == "short-lived" and gone.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("short-lived")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="short-lived", prompt="hello", max_tokens=2)
    assert len(dirs - set((srv.data_dir / "uploaded_models").glob("org-*/mdl-*"))) == 1
    with pytest.raises(openai.NotFoundError):
        client.models.delete("short-lived")
    with pytest.raises(openai.PermissionDeniedError) as err:
        sdk(srv, ADMIN_KEY).models.delete("gemma-3-270m")
    assert "configured by the server" in str(err.value)


def test_gguf_upload_as_fine_tuning_base_cannot_be_deleted_while_a_job_uses_it(
        srv, tenant, tmp_path) -> None:
    key = tenant["key"]
    gguf = models_cache() / "gemma-3-270m-q4_k_m.gguf"
    with gguf.open("rb") as f:
        r = upload(srv, key, "my-gemma", {"file": ("model.gguf", f)})
    assert r.status_code == 200, r.text
    assert "chat" in r.json()["capabilities"]
    client = sdk(srv, key)
    reply = client.chat.completions.create(model="my-gemma", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
    base = sdk(srv, ADMIN_KEY).chat.completions.create(
        model="gemma-3-270m", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == base.choices[0].message.content
    data = write_jsonl(tmp_path / "train.jsonl", duck_examples(12))
    file = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="my-gemma", training_file=file.id)
    assert job.status in ("validating_files", "queued")
    with pytest.raises(openai.ConflictError) as err:
        client.models.delete("my-gemma")
    assert job.id in err.value.message and err.value.code == "model_in_use"
    assert client.chat.completions.create(model="my-gemma", max_tokens=2,
                                          messages=[{"role": "user", "content": "Hi"}]).usage
    client.fine_tuning.jobs.cancel(job.id)
    assert client.models.delete("my-gemma").deleted is True
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("my-gemma")


def test_concurrent_requests_n_and_logprobs(srv, tenant, uploaded) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = sdk(srv, tenant["key"])
    ask = dict(model="custom-model", prompt="alpha bravo charlie", max_tokens=10, temperature=0)
    alone = client.completions.create(**ask).choices[0].text
    with ThreadPoolExecutor(4) as pool:  # streams advance together on the model's thread
        together = list(pool.map(lambda _: client.completions.create(**ask).choices[0].text,
                                 range(4)))
    assert together == [alone] * 4
    two = client.completions.create(model="custom-model", prompt="hello", max_tokens=6, n=2,
                                    temperature=1.0, seed=3)
    assert sorted(c.index for c in two.choices) == [0, 1]
    if all(c.finish_reason == "length" for c in two.choices):
        assert two.usage.completion_tokens == 12
    assert 0 < two.usage.completion_tokens <= 12
    lp = client.completions.create(**ask, logprobs=3).choices[0].logprobs
    assert "".join(lp.tokens).replace(" ", "") == alone.replace(" ", "")
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert max(top.values()) == top[token]  # greedy picks the most likely token


SMALL = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "tag"],
         "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                        "tag": {"type": "string", "maxLength": 6}}}


def test_structured_outputs_and_tools_on_the_pytorch_engine(srv, tenant, tmp_path) -> None:
    """Random weights write nothing sensible: the grammar alone, as a token mask, makes every
    answer valid JSON of the schema and every tool call match its parameters."""
    import jsonschema

    tiny_bytes = build_tiny_llama(tmp_path / "bytes", byte_level=True,
                                  max_position_embeddings=2048)
    r = upload(srv, tenant["key"], "bytes-model", form(tiny_bytes, "bytes-model"))
    assert r.status_code == 200, r.text
    client = sdk(srv, tenant["key"])
    r = client.chat.completions.create(
        model="bytes-model", messages=[{"role": "user", "content": "hello"}], n=2,
        temperature=1.0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL}})
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SMALL)
    tool = {"type": "function", "function": {"name": "paint", "parameters": SMALL}}
    r = client.chat.completions.create(
        model="bytes-model", messages=[{"role": "user", "content": "hello"}], tools=[tool],
        tool_choice="required", parallel_tool_calls=False, temperature=1.0, max_tokens=200)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "paint"
    jsonschema.validate(json.loads(call.function.arguments), SMALL)
