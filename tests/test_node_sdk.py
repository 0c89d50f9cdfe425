"""The official Node SDK (npm `openai`, pinned in tests/node/package-lock.json) against the real
server: chat, streaming, embeddings (the SDK's default base64, decoded by the SDK), files,
fine-tuning (jobs created and cancelled, not trained) and models, each checked against what
the Python SDK gets from the same server. The Node side is tests/node/sdk.mjs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from conftest import MODEL, RunningServer, make_tenant, start_server, stop_server
from ftdata import duck_examples, write_jsonl

NODE_DIR = Path(__file__).parent / "node"
HELLO = [{"role": "user", "content": "Name three colours."}]

pytestmark = [
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(not (NODE_DIR / "node_modules" / "openai").exists(),
                       reason="the openai npm package is not installed in tests/node: "
                              "run `make install-test` (npm ci --prefix tests/node)"),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("node"), "--parallel", "4", "--no-worker",
                     embeddings=True)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def tenant(srv: RunningServer) -> dict[str, Any]:
    org, key = make_tenant(srv.api, "scale", permissions=("inference", "training"), name="node")
    return {"org": org, "key": key["key"],
            "py": openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0, timeout=120)}


def node(srv: RunningServer, key: str, command: str, **args: Any) -> Any:
    env = {**os.environ, "OPENAI_BASE_URL": srv.api, "OPENAI_API_KEY": key}
    done = subprocess.run(["node", "sdk.mjs", command, json.dumps(args)], cwd=NODE_DIR, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_chat_and_streaming_match_the_python_sdk(srv, tenant) -> None:
    args = dict(model=MODEL, messages=HELLO, max_tokens=24, seed=5)
    want = tenant["py"].chat.completions.create(**args, temperature=0)
    got = node(srv, tenant["key"], "chat", **args)
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
    assert got["choices"][0]["message"]["role"] == "assistant"
    assert got["choices"][0]["message"]["content"] == want.choices[0].message.content
    assert got["usage"]["completion_tokens"] == want.usage.completion_tokens
    streamed = node(srv, tenant["key"], "stream", **args)
    assert streamed["text"] == want.choices[0].message.content
    assert streamed["finish_reason"] == want.choices[0].finish_reason
    assert streamed["usage"]["total_tokens"] == want.usage.total_tokens
    assert streamed["chunks"] > 2


def test_embeddings_base64_decoded_equal_the_python_floats(srv, tenant) -> None:
    inputs = ["The quick brown fox.", "Bastion serves embeddings."]
    want = tenant["py"].embeddings.create(model="all-minilm", input=inputs, encoding_format="float")
    got = node(srv, tenant["key"], "embeddings", model="all-minilm", input=inputs)
    assert got["usage"] == want.usage.model_dump()
    assert len(got["vectors"]) == 2
    for vec, ref in zip(got["vectors"], want.data):
        assert len(vec) == len(ref.embedding) == 384
        # base64 carries the float32 values themselves; the float form their decimal writing
        assert max(abs(a - b) for a, b in zip(vec, ref.embedding)) < 1e-6


def test_files_upload_list_retrieve_content_delete(srv, tenant, tmp_path) -> None:
    path = write_jsonl(tmp_path / "ducks.jsonl", duck_examples(4))
    got = node(srv, tenant["key"], "files", path=str(path))
    created = got["created"]
    assert created["id"].startswith("file-") and created["purpose"] == "fine-tune"
    assert created["bytes"] == path.stat().st_size and created["filename"] == "ducks.jsonl"
    assert created["id"] in got["listed"]
    assert got["retrieved"] == created
    assert got["content"] == path.read_text()
    assert got["deleted"] == {"id": created["id"], "object": "file", "deleted": True}
    assert got["after"] == {"status": 404, "type": "invalid_request_error", "name": "NotFoundError"}


def test_fine_tuning_create_list_retrieve_cancel(srv, tenant, tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", duck_examples(8))
    got = node(srv, tenant["key"], "fine_tuning", model="gemma", path=str(path))
    job = got["created"]
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert job["model"] == MODEL and job["status"] in ("validating_files", "queued")
    assert job["hyperparameters"]["n_epochs"] == 1
    assert job["id"] in got["listed"]
    assert got["retrieved"]["id"] == job["id"] and got["retrieved"]["training_file"] == job["training_file"]
    assert any(job["id"] in e["message"] for e in got["events"])
    assert got["cancelled"]["status"] == got["after"]["status"] == "cancelled"
    assert tenant["py"].fine_tuning.jobs.retrieve(job["id"]).status == "cancelled"


def test_models_list_and_retrieve(srv, tenant) -> None:
    got = node(srv, tenant["key"], "models", id=MODEL)
    want = tenant["py"].models.list().data
    assert [m["id"] for m in got["listed"]] == [m.id for m in want]
    assert {MODEL, "all-minilm-l6-v2"} <= {m["id"] for m in got["listed"]}
    assert got["retrieved"] == tenant["py"].models.retrieve(MODEL).model_dump(exclude_unset=True)
    assert got["missing"]["status"] == 404 and got["missing"]["name"] == "NotFoundError"
