"""GET /v1/models and /v1/models/{id} through the SDK."""

from __future__ import annotations

import openai
import pytest

from conftest import MODEL


def test_list_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    # the bundled chat models, the default (instruction-tuned) first, then the embedding model
    assert ids == ["smollm2-135m-instruct", MODEL, "all-minilm-l6-v2"]
    m = models.data[1]
    assert m.object == "model" and m.owned_by == "google" and m.created > 0
    extra = m.model_extra
    assert extra["context_length"] == 4096
    assert extra["parameters"] == "270M"


def test_retrieve_model_and_alias(client: openai.OpenAI) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("gemma").id == MODEL


def test_unknown_model_is_404_everywhere(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("gpt-4")
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body == {"message": "The model 'gpt-4' does not exist or you do not have "
                                         "access to it.", "type": "invalid_request_error",
                              "code": "model_not_found", "param": "model"}
