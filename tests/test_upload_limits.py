"""Model uploads cannot spend the server (issue 15, finding 5), through the real server:
config.json's sizes are bounded and checked against the weights before anything is built, an
organisation's uploads are within a quota of models and bytes (test_upload_quotas.py, which
the PostgreSQL pass runs too), a tenant's GGUF is parsed in a
process of its own (one that crashes llama.cpp's loader is a 400, and the server stays up),
and uploaded models are loaded on first use within a memory budget, never at start, the least
recently used idle one unloaded to make room and one serving a request never."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path

import httpx
import pytest

from conftest import RunningServer, bearer, make_tenant, models_cache, start_server, stop_server
from tiny_llama import build_tiny_llama

SERVER_ARGS = ("--no-bundled", "--no-worker", "--parallel", "2")


def form(directory: Path, *, weights: bytes | None = None, config: dict | None = None) -> dict:
    return {"file": ("model.safetensors", weights if weights is not None
                     else (directory / "model.safetensors").read_bytes()),
            "config": ("config.json", json.dumps(config).encode() if config is not None
                       else (directory / "config.json").read_bytes()),
            "tokenizer": ("tokenizer.json", (directory / "tokenizer.json").read_bytes()),
            "tokenizer_config": ("tokenizer_config.json",
                                 (directory / "tokenizer_config.json").read_bytes())}


def form_bytes(directory: Path) -> int:
    return sum(len(content) for _, content in form(directory).values())


def upload(srv: RunningServer, key: str, model_id: str, files: dict,
           timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{srv.api}/models", headers=bearer(key), files=files,
                      data={"model_id": model_id, "model_type": "causal-lm"}, timeout=timeout)


def safetensors(tensors: dict[str, list[int]]) -> bytes:
    """A float32 safetensors file of zeros with these shapes."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def alive(srv: RunningServer) -> None:
    assert srv.proc.poll() is None, srv.log()[-3000:]
    assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny: Path):
    # room for two uploads of the tiny model and a half: the third is over the bytes quota
    quota = int(form_bytes(tiny) * 2.5)
    s = start_server(tmp_path_factory.mktemp("limits"), *SERVER_ARGS,
                     env={"BASTION_CUSTOM_MODEL_BYTES_PER_ORG": str(quota)})
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def key(srv: RunningServer) -> str:
    _, created = make_tenant(srv.api, "scale", permissions=("models", "inference"),
                             name="limits")
    return created["key"]


def refused(r: httpx.Response, status: int, code: str, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    for needle in needles:
        assert needle in err["message"], err
    return err


@pytest.mark.timeout(180)
def test_absurd_config_sizes_are_refused_before_anything_is_built(srv, key, tiny) -> None:
    """The finding: 1 KB of weights with fifty million layers in config.json. Building that on
    the meta device took the API process's CPU and memory for hours; now it is arithmetic."""
    config = json.loads((tiny / "config.json").read_text())
    weights = safetensors({"model.embed_tokens.weight": [16, 16]})
    assert len(weights) < 1200
    started = time.monotonic()
    r = upload(srv, key, "layers", form(tiny, weights=weights,
                                         config={**config, "num_hidden_layers": 50_000_000}),
               timeout=60)
    err = refused(r, 400, "invalid_config", "num_hidden_layers", "50000000")
    assert err["type"] == "invalid_request_error" and err["param"] == "config"
    assert time.monotonic() - started < 30
    for field, value in (("hidden_size", 10 ** 9), ("vocab_size", 2 ** 40),
                         ("intermediate_size", 10 ** 12), ("max_position_embeddings", 10 ** 12),
                         ("num_attention_heads", 10 ** 7)):
        r = upload(srv, key, "big", form(tiny, weights=weights, config={**config, field: value}))
        refused(r, 400, "invalid_config", field)
    r = upload(srv, key, "nested", form(tiny, weights=weights, config={
        **config, "text_config": {"num_hidden_layers": 10 ** 8}}))
    refused(r, 400, "invalid_config", "text_config.num_hidden_layers")
    r = upload(srv, key, "float", form(tiny, weights=weights,
                                       config={**config, "num_hidden_layers": 2.5}))
    refused(r, 400, "invalid_config", "whole number")
    # within the bounds, but far more than the weights hold: named, before any build
    r = upload(srv, key, "floor", form(tiny, weights=weights, config={
        **config, "vocab_size": 200_000, "hidden_size": 8192, "num_attention_heads": 64,
        "num_key_value_heads": 64}))
    refused(r, 400, "config_mismatch", "vocab_size x hidden_size", "1,638,400,000")
    small = {**config, "vocab_size": 16, "hidden_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 4, "num_hidden_layers": 1000}
    r = upload(srv, key, "deep", form(tiny, weights=safetensors(
        {"model.embed_tokens.weight": [16, 64], "lm_head.weight": [16, 64]}), config=small))
    refused(r, 400, "config_mismatch", "num_hidden_layers (1000")
    alive(srv)
    models = httpx.get(f"{srv.api}/models", headers=bearer(key)).json()["data"]
    assert not {"layers", "big", "nested", "float", "floor", "deep"} & {m["id"] for m in models}


def crashing_gguf(path: Path) -> Path:
    """A well-formed GGUF whose hyperparameters contradict each other where llama.cpp's loader
    asserts (two experts used per token, none declared): its GGML_ASSERT aborts the process
    that loads it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_used_count(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.timeout(300)
def test_a_gguf_that_crashes_llama_cpp_is_a_400_and_the_server_stays_up(srv, key,
                                                                          tmp_path) -> None:
    crafted = crashing_gguf(tmp_path / "crash.gguf")
    r = upload(srv, key, "crash", {"file": ("crash.gguf", crafted.read_bytes())})
    err = refused(r, 400, "invalid_model", "GGUF", "aborted")
    assert err["param"] == "file"
    alive(srv)
    # a truncated GGUF (the bundled one, cut in its vocabulary) is refused the same way
    with (models_cache() / "gemma-3-270m-q4_k_m.gguf").open("rb") as f:
        head = f.read(128 * 1024)
    r = upload(srv, key, "truncated", {"file": ("cut.gguf", head)})
    refused(r, 400, "invalid_model", "GGUF")
    alive(srv)
    listed = httpx.get(f"{srv.api}/models", headers=bearer(key)).json()["data"]
    assert not {"crash", "truncated"} & {m["id"] for m in listed}


def _loads(srv: RunningServer, name: str) -> int:
    return srv.log().count(f"loading uploaded model {name} (about")


def _profile_cost(srv: RunningServer, model_file: str) -> int:
    for profile in (srv.data_dir / "uploaded_models").glob("org-*/mdl-*/profile.json"):
        if (profile.parent / model_file).exists():
            return json.loads(profile.read_text())["cost"]
    raise AssertionError(f"no profile beside {model_file}")


@pytest.mark.timeout(900)
def test_uploads_load_lazily_within_the_memory_budget(tmp_path, tiny) -> None:
    data = tmp_path / "data"
    first = start_server(tmp_path, *SERVER_ARGS, data_dir=data)
    try:
        _, created = make_tenant(first.api, "scale", permissions=("models", "inference"),
                                 name="lazy")
        key = created["key"]
        with (models_cache() / "gemma-3-270m-q4_k_m.gguf").open("rb") as f:
            r = upload(first, key, "g1", {"file": ("model.gguf", f)}, timeout=600)
        assert r.status_code == 200, r.text
        assert upload(first, key, "t1", form(tiny)).status_code == 200
        big, small = _profile_cost(first, "model.gguf"), _profile_cost(first, "model.safetensors")
    finally:
        stop_server(first)
    assert big > 250 * 2 ** 20 and 0 < small < big

    # a replica with room for either model but not both
    srv = start_server(tmp_path, *SERVER_ARGS, data_dir=data,
                       env={"BASTION_CUSTOM_MODEL_MEMORY": str(big + small - 1)})
    try:
        listed = {m["id"]: m for m in
                  httpx.get(f"{srv.api}/models", headers=bearer(key)).json()["data"]}
        assert {"g1", "t1"} <= set(listed)  # listed from their profiles...
        assert "chat" in listed["g1"]["capabilities"]
        assert _loads(srv, "g1") == 0 and _loads(srv, "t1") == 0  # ...and not loaded at start

        async def busy_then_other() -> tuple[int, dict, str]:
            async with httpx.AsyncClient(base_url=srv.api, headers=bearer(key),
                                         timeout=300) as client:
                body = {"model": "g1", "prompt": "Once upon a time", "max_tokens": 200,
                        "stream": True, "temperature": 1.0, "seed": 3}
                async with client.stream("POST", "/completions", json=body) as stream:
                    assert stream.status_code == 200
                    lines = stream.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: {"):
                            break
                    # g1 is generating: t1 cannot have its memory, and g1 is not unloaded
                    other = await client.post("/completions", json={
                        "model": "t1", "prompt": "hello", "max_tokens": 2})
                    rest = [line async for line in lines]
                return other.status_code, other.json(), "\n".join(rest)

        status, body, rest = asyncio.run(busy_then_other())
        assert status == 503, body
        assert body["error"]["code"] == "model_overloaded"
        assert rest.rstrip().endswith("data: [DONE]")  # the running stream finished whole
        assert "unloading uploaded model g1" not in srv.log()
        time.sleep(1.5)  # past the grace after a request
        # now idle, g1 makes room for t1; and the other way round
        r = httpx.post(f"{srv.api}/completions", headers=bearer(key), timeout=120,
                       json={"model": "t1", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert "unloading uploaded model g1 to make room for t1" in srv.log()
        time.sleep(1.5)
        r = httpx.post(f"{srv.api}/chat/completions", headers=bearer(key), timeout=120,
                       json={"model": "g1", "max_tokens": 2,
                             "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        assert "unloading uploaded model t1 to make room for g1" in srv.log()
        assert _loads(srv, "g1") == 2 and _loads(srv, "t1") == 1
    finally:
        stop_server(srv)
