"""Security review (issue 15), the smaller findings, each through a real server: the
server-admin key rotates (BASTION_ADMIN_KEY, `bastion keys rotate-admin` / `revoke-admin`) and
a custom one keeps no clear prefix; the dashboard's cookies can be forced Secure with the
__Host- prefix; a duplicate usage row no longer drops its ledger batch; a request for an
unknown model does not sync the catalogue; n x prompts take that many concurrency slots;
upstream bodies are size-limited and upstream errors reach tenants without internals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, database_rows, make_tenant,
                      models_cache, start_server, stop_server)
from polling import poll

# no model to load: these servers start in seconds
LIGHT = ("--no-bundled", "--no-worker", "--parallel", "1")
KEY_1 = "sk-bst-first-custom-admin-key-abcdef"
KEY_2 = "sk-bst-second-custom-admin-key-uvwxyz"


def status_of(server: RunningServer, key: str) -> tuple[int, str | None]:
    r = httpx.get(f"{server.api}/organizations", headers=bearer(key), timeout=30)
    return r.status_code, (r.json()["error"]["code"] if r.status_code != 200 else None)


def cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BASTION_DATABASE_URL": server.database_url}
    env.pop("BASTION_ADMIN_KEY", None)
    return subprocess.run([sys.executable, "-m", "bastion.cli", "keys", *args, "--data-dir",
                           str(server.data_dir)], env=env, capture_output=True, text=True,
                          timeout=120, check=True)


# --- a. and b. the server administrator's key --------------------------------------------------
def test_admin_key_rotation_and_revocation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # first start without BASTION_ADMIN_KEY: a generated key, printed once
    srv = start_server(tmp_path, *LIGHT, data_dir=data, env={"BASTION_ADMIN_KEY": None})
    try:
        found = re.search(r"shown only this once:\s+(sk-bst-\S+)", srv.log())
        assert found, srv.log()
        generated = found.group(1)
        assert status_of(srv, generated) == (200, None)
        # a generated key keeps its first 12 characters, as every generated key does
        row = next(r for r in database_rows(srv, "api_keys") if r["is_server_admin"])
        assert row["prefix"] == generated[:12]

        # rotate from the CLI while the server runs: the old key stops at its next request
        out = cli(srv, "rotate-admin")
        rotated = out.stdout.strip().splitlines()[-1]
        assert rotated.startswith("sk-bst-") and rotated != generated
        assert status_of(srv, generated) == (401, "api_key_revoked")
        assert status_of(srv, rotated) == (200, None)

        # revoke without a new one (a leak): nothing works until the next start
        out = cli(srv, "revoke-admin")
        assert "revoked 1 server-admin key" in out.stdout
        assert status_of(srv, rotated) == (401, "api_key_revoked")
    finally:
        stop_server(srv)

    # BASTION_ADMIN_KEY chosen: adopted; then a new value revokes the previous one
    srv = start_server(tmp_path, *LIGHT, data_dir=data, env={"BASTION_ADMIN_KEY": KEY_1})
    try:
        assert status_of(srv, KEY_1) == (200, None)
    finally:
        stop_server(srv)
    srv = start_server(tmp_path, *LIGHT, data_dir=data, env={"BASTION_ADMIN_KEY": KEY_2})
    try:
        assert status_of(srv, KEY_1) == (401, "api_key_revoked")
        assert status_of(srv, KEY_2) == (200, None)
        active = [r for r in database_rows(srv, "api_keys")
                  if r["is_server_admin"] and r["revoked_at"] is None]
        assert len(active) == 1
        # b. a custom key's characters are not kept in clear: only the public tag
        for row in database_rows(srv, "api_keys"):
            for key in (KEY_1, KEY_2):
                assert key[len("sk-bst-"):12] not in row["prefix"], row
        assert active[0]["prefix"] == "sk-bst-"
        home = httpx.get(f"{srv.api}/organizations", headers=bearer(KEY_2)).json()["data"][0]
        listed = httpx.get(f"{srv.api}/organizations/{home['id']}/api-keys",
                           headers=bearer(KEY_2)).json()["data"]
        assert all(KEY_2[:12] not in k["prefix"] for k in listed)
    finally:
        stop_server(srv)
    # the revoked value set again stays revoked (it was rotated away on purpose)
    srv = start_server(tmp_path, *LIGHT, data_dir=data, env={"BASTION_ADMIN_KEY": KEY_1})
    try:
        assert status_of(srv, KEY_1) == (401, "api_key_revoked")
        assert status_of(srv, KEY_2) == (200, None)  # not replaced by a revoked value
    finally:
        stop_server(srv)


# --- c. the dashboard's cookies behind a TLS proxy ----------------------------------------------
@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """No models; dashboard cookies forced Secure, as behind a proxy that ends TLS; the
    periodic model sync only at start, so that the syncs counted are the requests' own."""
    srv = start_server(tmp_path_factory.mktemp("light"), *LIGHT,
                       env={"BASTION_SECURE_COOKIES": "true",
                            "BASTION_WORKER_POLL_SECONDS": "600"})
    yield srv
    stop_server(srv)


def set_cookies(r: httpx.Response) -> dict[str, str]:
    """name -> the whole Set-Cookie line."""
    return {line.split("=", 1)[0]: line for line in r.headers.get_list("set-cookie")}


def test_secure_cookies_have_the_host_prefix(light: RunningServer) -> None:
    base = light.base_url
    page = httpx.get(f"{base}/dashboard/login")  # plain http, as the proxy talks to Bastion
    assert page.status_code == 200
    cookies = set_cookies(page)
    assert list(cookies) == ["__Host-bastion_login"], cookies
    line = cookies["__Host-bastion_login"].lower()
    assert "; secure" in line and "; path=/;" in line + ";" and "domain=" not in line
    assert "httponly" in line and "samesite=strict" in line
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    login_cookie = cookies["__Host-bastion_login"].split(";", 1)[0]
    signed = httpx.post(f"{base}/dashboard/login", headers={"Cookie": login_cookie},
                        data={"csrf_token": token, "api_key": ADMIN_KEY, "next": "/dashboard/"})
    assert signed.status_code == 303, signed.text
    session = set_cookies(signed)
    line = session["__Host-bastion_session"].lower()
    assert "; secure" in line and "; path=/;" in line + ";"
    # the sign-in form's cookie is cleared under its own (prefixed) name
    assert "__Host-bastion_login" in session
    cookie = session["__Host-bastion_session"].split(";", 1)[0]
    assert httpx.get(f"{base}/dashboard/", headers={"Cookie": cookie}).status_code == 200
    # the unprefixed name is not read: a cookie planted by a sibling site or over http
    # cannot stand in for the session
    plain = cookie.replace("__Host-", "", 1)
    r = httpx.get(f"{base}/dashboard/", headers={"Cookie": plain})
    assert r.status_code == 303 and "/dashboard/login" in r.headers["location"]


# --- d. the ledger on a database without ON CONFLICT DO NOTHING --------------------------------
def test_duplicate_row_does_not_drop_the_ledger_batch(tmp_path: Path) -> None:
    """The ledger on a real, migrated database, writing with the plain INSERT it uses on
    databases other than SQLite and PostgreSQL: one duplicate in a batch used to fail the whole
    statement ten times over, then the batch was given up."""
    from sqlalchemy import insert, select

    from bastion.db.session import make_engine, migrate
    from bastion.db.tables import UsageRecord
    from bastion.usage.ledger import Ledger, UsageRow

    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    ledger = Ledger(engine)
    ledger._insert = insert(UsageRecord)  # what the ledger runs on other databases

    def row(request_id: str, tokens: int) -> UsageRow:
        return UsageRow(request_id=request_id, org_id="org-1", key_id="key-1", model=MODEL,
                        endpoint="chat", prompt_tokens=tokens, completion_tokens=1,
                        status="ok", latency_ms=5, created_at=datetime.now(timezone.utc))

    try:
        ledger.record(row("req-first", 10))
        assert ledger.flush()
        started = time.monotonic()
        for r in (row("req-a", 1), row("req-first", 999), row("req-b", 2), row("req-c", 3)):
            ledger.record(r)  # one batch: recorded within the writer's collection window
        assert ledger.flush(timeout=30)
        assert time.monotonic() - started < 5  # not ten retries of the doomed batch
        with engine.connect() as conn:
            rows = {r.request_id: r.prompt_tokens for r in conn.execute(select(UsageRecord))}
        assert rows == {"req-first": 10, "req-a": 1, "req-b": 2, "req-c": 3}
        assert ledger.duplicates == 1
    finally:
        ledger.close()
        engine.dispose()


# --- e. an unknown model does not sync the catalogue -------------------------------------------
def catalog_syncs(server: RunningServer) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", headers=bearer(ADMIN_KEY)).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^bastion_model_catalog_syncs_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def test_unknown_models_do_not_sync_the_catalogue(light: RunningServer) -> None:
    from sqlalchemy import create_engine, insert

    from bastion.db.tables import CustomModel

    org_id, key = make_tenant(light.api, name="miss")
    before = catalog_syncs(light)
    assert before.get("startup") == 1, before
    for i in range(50):
        r = httpx.get(f"{light.api}/models/no-such-model-{i}", headers=bearer(key["key"]))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    after = catalog_syncs(light)
    assert after.get("miss", 0) - before.get("miss", 0) <= 1, after

    # a model the database holds (as if another replica had just taken its upload) is
    # still found on the first request for it, by one sync
    folder = light.data_dir / "elsewhere"
    folder.mkdir()
    os.symlink(models_cache() / "gemma-3-270m-q4_k_m.gguf", folder / "model.gguf")
    engine = create_engine(light.database_url)
    with engine.begin() as conn:
        conn.execute(insert(CustomModel).values(
            id="cm-elsewhere", org_id=org_id, model_id="made-elsewhere", model_type="gguf",
            format="gguf", path=str(folder), bytes=1, created_at=datetime.now(timezone.utc)))
    engine.dispose()
    r = httpx.get(f"{light.api}/models/made-elsewhere", headers=bearer(key["key"]), timeout=120)
    assert r.status_code == 200, r.text
    assert catalog_syncs(light).get("miss", 0) - after.get("miss", 0) == 1


# --- f. n x prompts count as that many concurrent sequences -----------------------------------
@pytest.fixture(scope="module")
def models_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The bundled chat models, without the embedding model or a worker (a quicker start)."""
    srv = start_server(tmp_path_factory.mktemp("models"), "--parallel", "4", "--no-worker")
    yield srv
    stop_server(srv)


def test_n_counts_against_concurrency(models_srv: RunningServer) -> None:
    api = models_srv.api
    _, created = make_tenant(api, limits={"concurrent_requests": 2}, name="sequences")
    key = created["key"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
    r = httpx.post(f"{api}/completions", headers=bearer(key), json={**body, "n": 4}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert r.json()["error"]["param"] == "n"
    # two prompts x n=2: four sequences as well
    r = httpx.post(f"{api}/completions", headers=bearer(key),
                   json={**body, "prompt": ["a", "b"], "n": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "concurrency_limit_exceeded"

    async def run() -> tuple[int, str]:
        async with httpx.AsyncClient(base_url=api, timeout=120, headers=bearer(key)) as client:
            async with client.stream("POST", "/completions", json={
                    **body, "max_tokens": 400, "n": 2, "stream": True}) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                while not (await lines.__anext__()).startswith("data:"):
                    pass
                # both slots are taken by the two sequences: one more request is refused
                other = await client.post("/completions", json=body)
                return other.status_code, other.json().get("error", {}).get("code", "")

    assert asyncio.run(run()) == (429, "concurrency_limit_exceeded")
    # the stream was closed: its two slots come back (once its generation has unwound)
    again = poll(lambda: httpx.post(f"{api}/completions", headers=bearer(key),
                                    json={**body, "n": 2}, timeout=60),
                 lambda r: r.status_code == 200, timeout=30, interval=0.3)
    assert again.status_code == 200, again.text


# --- g. upstream bodies and errors --------------------------------------------------------------
LEAKS = ("10.9.8.7", "gpu-node-7", "/srv/models", "/opt/vllm", "Traceback", "http://",
         "engine.py")
HUGE = 4 * 1024 * 1024


class HostileUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that misbehaves on purpose, by the model asked for."""

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._send(200, b'{"object": "list", "data": []}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body.get("model")
        if model == "fails":
            self._send(500, json.dumps({"error": {"message": (
                "Traceback (most recent call last):\n  File \"/opt/vllm/engine.py\", line 7, "
                "in step\nRuntimeError: CUDA error on gpu-node-7.internal:8000 "
                "(http://10.9.8.7:8000/v1)"), "type": "server_error"}}).encode())
        elif model == "refuses":
            self._send(400, json.dumps({"error": {"message": (
                "The prompt template /srv/models/llama/template.jinja on gpu-node-7.internal:8000 "
                "(see http://10.9.8.7:8000/docs) rejected message 2"), "type": "BadRequest",
                "param": "messages", "code": "bad_prompt"}}).encode())
        elif model == "huge" and body.get("stream"):
            # one endless line: never a complete event
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                self.wfile.write(b"data: {\"x\": \"" + b"y" * HUGE)
                self.wfile.flush()
                time.sleep(5)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif model == "huge":
            answer = {"id": "x", "object": "chat.completion", "created": 0, "model": "huge",
                      "choices": [{"index": 0, "finish_reason": "stop", "message": {
                          "role": "assistant", "content": "y" * HUGE}}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            self._send(200, json.dumps(answer).encode())
        else:
            self._send(404, b'{"error": {"message": "no such model"}}')


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    hostile = ThreadingHTTPServer(("127.0.0.1", 0), HostileUpstream)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    url = f"http://localhost:{hostile.server_address[1]}/v1"
    specs = [{"id": name, "urls": [url], "tokenize": "none", "max_response_bytes": 1024 * 1024}
             for name in ("fails", "refuses", "huge")]
    srv = start_server(tmp_path_factory.mktemp("front"), *LIGHT,
                       env={"BASTION_UPSTREAMS": json.dumps(specs)})
    yield srv
    stop_server(srv)
    hostile.shutdown()


def front_error(front: RunningServer, model: str, stream: bool) -> tuple[int, dict[str, Any]]:
    r = httpx.post(f"{front.api}/chat/completions", headers=bearer(ADMIN_KEY), timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 4, "stream": stream})
    if r.status_code != 200:
        return r.status_code, r.json()["error"]
    # a stream that failed after its start carries the error as an event
    events = [json.loads(line[5:]) for line in r.text.splitlines()
              if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    errors = [e["error"] for e in events if "error" in e]
    assert errors, r.text[:500]
    return 200, errors[0]


def test_upstream_errors_reach_tenants_without_internals(front: RunningServer) -> None:
    for stream in (False, True):
        status, err = front_error(front, "fails", stream)
        assert (status, err["code"]) == (502, "upstream_error"), err
        assert not [leak for leak in LEAKS if leak in err["message"]], err
        status, err = front_error(front, "refuses", stream)
        assert status == 400 and err["code"] == "bad_prompt" and err["param"] == "messages"
        assert "rejected message 2" in err["message"]  # the useful part stays
        assert not [leak for leak in LEAKS if leak in err["message"]], err
    assert "gpu-node-7" in front.log()  # the operator still has the whole story


def test_upstream_bodies_have_a_size_limit(front: RunningServer) -> None:
    for stream in (False, True):
        status, err = front_error(front, "huge", stream)
        assert status in (200, 502) and err["code"] == "upstream_error", err
        assert "larger than" in err["message"], err
        if not stream:
            assert status == 502
    assert httpx.get(f"{front.base_url}/health").status_code == 200
