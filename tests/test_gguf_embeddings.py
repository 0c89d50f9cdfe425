"""/v1/embeddings from the bundled chat GGUF models (llama.cpp's mean pooling in a second
context), through the SDK, with MiniLM's validation and limits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import llama_cpp
import numpy as np
import openai
import pytest

from conftest import ADMIN_KEY, MODEL, RunningServer, start_server, stop_server

SMOLLM2 = "smollm2-135m-instruct"
HIDDEN = {SMOLLM2: 576, MODEL: 640}  # embedding_length of each GGUF
SIMILAR = ["The cat sat on the mat.", "A kitten was sitting on the rug."]
UNRELATED = "Interest rates rose sharply at the central bank's meeting."


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server of its own without the MiniLM model (PyTorch would add seconds to its start)."""
    s = start_server(tmp_path_factory.mktemp("ggufemb"), "--parallel", "4")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.api, api_key=ADMIN_KEY, max_retries=0, timeout=300)


def vectors(resp) -> np.ndarray:
    return np.array([d.embedding for d in resp.data], dtype=np.float64)


def assert_same_vectors(a: np.ndarray, b: np.ndarray) -> None:
    """The same inputs in batches of another composition: llama.cpp's float sums differ with
    the batch (the lowest cosine seen was 0.99992), never by more than rounding."""
    cos = np.sum(a * b, axis=1)  # both are unit vectors
    assert cos.min() > 0.999, cos


def post(srv: RunningServer, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.api}/embeddings", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"})


@pytest.fixture(scope="module")
def smol_vocab() -> llama_cpp.Llama:
    from bastion.models.bundled import bundled_smollm2

    return llama_cpp.Llama(str(bundled_smollm2()), vocab_only=True, verbose=False)


@pytest.mark.parametrize("name", ["smollm2", "gemma"])
def test_chat_model_embeds(client: openai.OpenAI, name: str) -> None:
    model = client.models.retrieve(name).id
    card = client.models.retrieve(model)
    assert "embeddings" in card.model_extra["capabilities"]
    assert card.model_extra["dimensions"] == HIDDEN[model]
    resp = client.embeddings.create(model=name, input=[*SIMILAR, UNRELATED],
                                    encoding_format="float")
    assert resp.model == model
    v = vectors(resp)
    assert v.shape == (3, HIDDEN[model])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] and v[0] @ v[1] > v[1] @ v[2]  # similar texts are closer
    again = vectors(client.embeddings.create(model=name, input=SIMILAR[0],
                                             encoding_format="float"))
    assert_same_vectors(again, v[:1])  # alone or batched: the same vector
    packed = client.embeddings.create(model=name, input=[*SIMILAR, UNRELATED])  # SDK's base64
    np.testing.assert_allclose(vectors(packed), v, atol=1e-6)


def test_usage_is_the_inputs_own_tokens(client: openai.OpenAI,
                                        smol_vocab: llama_cpp.Llama) -> None:
    resp = client.embeddings.create(model="smollm2", input=SIMILAR)
    want = sum(len(smol_vocab.tokenize(s.encode(), add_bos=False, special=False))
               for s in SIMILAR)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == want
    ids = smol_vocab.tokenize(SIMILAR[0].encode(), add_bos=False, special=False)
    by_ids = client.embeddings.create(model="smollm2", input=[ids], encoding_format="float")
    by_text = client.embeddings.create(model="smollm2", input=SIMILAR[0],
                                       encoding_format="float")
    np.testing.assert_allclose(vectors(by_ids), vectors(by_text), atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids)


def test_concurrent_requests_batch_and_agree(client: openai.OpenAI) -> None:
    texts = [f"Sentence number {i} is about {w}." for i, w in
             enumerate(["rain", "trains", "coffee", "chess", "jazz", "volcanoes", "tea", "bread"])]
    alone = vectors(client.embeddings.create(model="smollm2", input=texts,
                                             encoding_format="float"))
    with ThreadPoolExecutor(8) as pool:
        each = list(pool.map(lambda t: client.embeddings.create(
            model="smollm2", input=t, encoding_format="float"), texts))
    assert_same_vectors(np.vstack([vectors(r) for r in each]), alone)


@pytest.mark.parametrize("body, param, fragment", [
    ({"input": "x", "dimensions": 100}, "dimensions", "576-dimensional"),
    ({"input": [[1, 2], [49152]]}, "input[1]", "outside this model's vocabulary"),
    ({"input": [[5], []]}, "input", "input[1] is an empty token array"),
    ({"input": ["ok", ""]}, "input", "input[1] is an empty string"),
    ({"input": ["x"] * 2049}, "input", "at most 2048 inputs"),
    ({"input": ["fine", "word " * 600]}, "input[1]", "at most 512 tokens per input"),
])
def test_bad_input(srv: RunningServer, body: dict, param: str, fragment: str) -> None:
    """The same checks and errors as the MiniLM model's (tests/test_embeddings.py)."""
    r = post(srv, {"model": "smollm2", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    assert fragment in err["message"]


def test_truncate_and_own_dimensions(srv: RunningServer, client: openai.OpenAI) -> None:
    long = "word " * 600
    r = post(srv, {"model": "smollm2", "input": long, "truncate": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 512  # the engine's batch: one input's limit
    same = client.embeddings.create(model="smollm2", input="hello", dimensions=576)
    assert len(same.data[0].embedding) == 576
