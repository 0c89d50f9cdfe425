"""Every example of the specification documents (../shared/spec/), read from the document's own
text and run unchanged against one real server, but for the host, the key and the ids of
things the example assumes exist: curl with curl, Python with this venv's python, Node.js
with node (the `openai` npm package from tests/node). The documents' model names are served
as aliases of the bundled model, added on the command line and in BASTION_ALIASES; the
Avangenio document's clients talk to the API at the root, without /v1.

Each example must exit 0; where the document shows what it prints (a `Response:` block), what
it printed must have every field the document's response has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from conftest import ADMIN_KEY, MODEL, RunningServer, make_tenant, start_server, stop_server
from ftdata import duck_examples, write_jsonl
from spec_examples import Block, examples, spec_documents, substitute

NODE_DIR = Path(__file__).parent / "node"
CLI_ALIASES = ["radiance", "spark", "supernova", "chiro"]  # --alias NAME=gemma-3-270m
ENV_ALIASES = ["mistral-7b-instruct", "mistral-7b"]  # BASTION_ALIASES


@dataclass
class Document:
    """The substitution table of one document: its hosts and keys, and the ids of things its
    examples take for granted (an organisation, an uploaded file, a job)."""

    name: str
    hosts: list[str]
    keys: dict[str, str]  # placeholder -> "tenant" or "admin"
    ids: dict[str, str] = field(default_factory=dict)  # placeholder -> a fixture's value
    root: bool = False  # its host stands for the server's root, not .../v1's host


DOCUMENTS = {
    "000_5513cc04d614b113.txt": Document("a3gate", ["https://a3gate.in"], {}),
    "001_523610732093837d.txt": Document("avangenio", ["https://apigateway.avangenio.net"],
                                         {"YOUR_API_KEY": "tenant"}, root=True),
    "002_bcb8a3fc7c93ad8e.txt": Document(
        "achiral", ["https://api.achiral.ai", "https://abc123xyz.nano.achiral.ai",
                    "wss://abc123xyz.nano.achiral.ai"],
        {"YOUR_API_KEY": "tenant", "YOUR_ACCOUNT_KEY": "admin"},
        {"{org_id}": "org", "file-abc123": "file", "ftjob-abc123": "job"}),
}
# Examples that need what Bastion does not offer yet: (document, line) -> why.
NOT_YET: dict[tuple[str, int], str] = {}  # (document, line): why it cannot run yet


def cases() -> Iterator[Any]:
    for path in spec_documents():
        doc = DOCUMENTS[path.name]
        found = examples(path)
        if not found:
            yield pytest.param(path, None, id=f"{doc.name}-no-examples")
        for block in found:
            marks = ([pytest.mark.xfail(reason=NOT_YET[(doc.name, block.line)], strict=True)]
                     if (doc.name, block.line) in NOT_YET else [])
            yield pytest.param(path, block, id=f"{doc.name}-{block.line}-{block.kind}", marks=marks)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    aliases = [a for name in CLI_ALIASES for a in ("--alias", f"{name}={MODEL}")]
    s = start_server(tmp_path_factory.mktemp("spec"), "--parallel", "4", "--no-worker", *aliases,
                     env={"BASTION_ALIASES": ",".join(f"{n}={MODEL}" for n in ENV_ALIASES),
                          # most examples set no max_tokens: a short default keeps them quick
                          "BASTION_DEFAULT_MAX_TOKENS": "48"})
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def world(srv: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the examples take for granted: an organisation with a key, a training file, a job."""
    org, key = make_tenant(srv.api, "scale", permissions=("inference", "training", "models"),
                           name="spec")
    sdk = openai.OpenAI(base_url=srv.api, api_key=key["key"], max_retries=0)
    data = write_jsonl(tmp_path_factory.mktemp("spec-data") / "train.jsonl", duck_examples(8))
    file = sdk.files.create(file=data.open("rb"), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=file.id)
    return {"tenant": key["key"], "admin": ADMIN_KEY, "org": org, "file": file.id, "job": job.id}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where examples run: the Node clients at hand, and the files the upload example sends."""
    from tiny_llama import build_tiny_llama

    d = tmp_path_factory.mktemp("examples")
    if (NODE_DIR / "node_modules").exists():
        (d / "node_modules").symlink_to(NODE_DIR / "node_modules")
    build_tiny_llama(d)  # model.safetensors and config.json, as `-F file=@model.safetensors`
    return d


def localise(text: str, doc: Document, srv: RunningServer, world: dict[str, str]) -> str:
    base = srv.base_url
    table = {}
    for host in doc.hosts:
        table[host] = base.replace("http://", "ws://") if host.startswith("wss://") else base
    table.update({k: world[v] for k, v in doc.keys.items()})
    table.update({k: world[v] for k, v in doc.ids.items()})
    return substitute(text, table)


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    """One example; the long timeout is for a loaded 2-core machine (the 500-token example)."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def node(script: str, cwd: Path) -> str:
    if not shutil.which("node"):
        pytest.skip("node is not installed")
    if "from 'openai'" in script or 'from "openai"' in script:
        if not (NODE_DIR / "node_modules" / "openai").exists():
            pytest.skip("the openai npm package is not installed: run `make install-test`")
    path = cwd / "example.mjs"  # an ES module: the examples use import and top-level await
    path.write_text(script)
    return run(["node", "--experimental-websocket", str(path)], cwd)


# The browser-style WebSocket examples are fragments of one page: the first opens and
# authenticates, the second sends on the open socket. The glue waits for what a page would
# (the socket authenticated, the answer done) and closes the socket so that node exits.
WS_AUTHENTICATED = """
await new Promise((resolve, reject) => {
  ws.addEventListener('message', e => {
    const m = JSON.parse(e.data)
    if (m.type === 'authenticated') resolve()
    if (m.type === 'error') reject(new Error(e.data))
  })
  ws.addEventListener('error', () => reject(new Error('websocket error')))
})
"""
WS_DONE = """
await new Promise((resolve, reject) => {
  ws.addEventListener('message', e => {
    const m = JSON.parse(e.data)
    if (m.type === 'done') resolve()
    if (m.type === 'error') reject(new Error(e.data))
  })
})
"""


def node_program(block: Block, previous: list[Block]) -> str:
    """The example, or for a fragment that uses `ws` without opening it, the page it belongs
    to: the example before it that opens the socket, then this one."""
    if "new WebSocket(" in block.text:
        return block.text + WS_AUTHENTICATED + "ws.close()\n"
    if re.search(r"^ws\.", block.text, re.M):
        opener = next(b for b in reversed(previous) if "new WebSocket(" in b.text)
        return opener.text + WS_AUTHENTICATED + block.text + WS_DONE + "ws.close()\n"
    return block.text


def documented(want: Any, got: Any, where: str = "") -> None:
    """Every field of the document's response is in what the server sent, of the same kind."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {got!r}"
        for k, v in want.items():
            assert k in got, f"{where}.{k} missing from {got!r}"
            documented(v, got[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and (got or not want), f"{where}: {got!r}"
        if want and got:
            documented(want[0], got[0], f"{where}[0]")
    elif isinstance(want, (int, float)) and not isinstance(want, bool):
        assert isinstance(got, (int, float)), f"{where}: {got!r}"
    elif isinstance(want, str):
        assert isinstance(got, str), f"{where}: {got!r}"


def response_json(block: Block) -> Any:
    return json.loads(re.sub(r",\s*\.\.\.\s*\]", "]", block.text))  # "[0.123, ..., ...]"


def check_curl(block: Block, out: str) -> None:
    if block.response is not None and block.response.kind == "sse":
        events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", out
        want = json.loads(block.response.text.splitlines()[0][6:])
        chunks = [json.loads(e) for e in events[:-1]]
        for chunk in chunks:
            documented({"id": want["id"], "choices": [{"delta": {}}]}, chunk)
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks), out
        return
    body = json.loads(out)
    assert body.get("error") is None, body
    if block.response is not None:
        documented(response_json(block.response), body)


@pytest.mark.parametrize(("path", "block"), list(cases()))
def test_example(path: Path, block: Block | None, srv: RunningServer, world: dict[str, str],
                 workdir: Path) -> None:
    doc = DOCUMENTS[path.name]
    if block is None:
        pytest.skip(f"{path.name} ({doc.name}) holds no code examples, only endpoint tables")
    code = localise(block.text, doc, srv, world)
    if doc.root:  # the document's clients are pointed at the root: nothing may add /v1
        assert srv.base_url + "/v1" not in code
    if block.kind == "curl":
        if not shutil.which("curl"):
            pytest.skip("curl is not installed")
        out = run(["bash", "-c", code], workdir)
        if "-F \"file=@model.safetensors\"" in code:
            # The document uploads weights and a config only. A safetensors model without its
            # tokenizer cannot be served, and Bastion says so (upload tokenizer.json too).
            err = json.loads(out)["error"]
            assert err["type"] == "invalid_request_error" and "tokenizer.json" in err["message"]
            return
        check_curl(block, out)
    elif block.kind == "python":
        out = run([sys.executable, "-c", code], workdir)
        assert out.strip(), "the example printed nothing"
    else:
        earlier = [localise(b.text, doc, srv, world) for b in examples(path) if b.line < block.line]
        program = node_program(Block(block.kind, code, block.line),
                               [Block("node", t, 0) for t in earlier])
        out = node(program, workdir)
        assert out.strip(), "the example printed nothing"
        if "new WebSocket(" in block.text:
            assert "authenticated" in out, out
        elif re.search(r"^ws\.", block.text, re.M):  # sent on the socket the page opened
            assert "Complete!" in out, out
        if "getReader()" in block.text:  # one console.log per SSE chunk, the text among them
            lines = out.splitlines()
            assert len(lines) > 1 and any(x not in ("", "undefined") for x in lines), out
