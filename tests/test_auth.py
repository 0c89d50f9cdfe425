"""Every /v1 request needs a valid bearer key."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import MODEL, RunningServer


@pytest.mark.parametrize("path,method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                         ("/v1/completions", "POST"), ("/v1/models/x", "GET")])
def test_missing_key_is_401(server: RunningServer, path: str, method: str) -> None:
    r = httpx.request(method, server.base_url + path, json={})
    assert r.status_code == 401
    assert r.json() == {"error": {
        "message": "You didn't provide an API key. Send it in the Authorization header as "
                   "'Authorization: Bearer YOUR_API_KEY'.",
        "type": "authentication_error", "code": "missing_api_key", "param": None}}


def test_wrong_key_is_401_invalid_api_key(server: RunningServer) -> None:
    bad = openai.OpenAI(base_url=server.api, api_key="sk-bst-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 401
    assert exc.value.body["type"] == "authentication_error"
    assert exc.value.body["code"] == "invalid_api_key"


def test_wrong_scheme_is_401(server: RunningServer) -> None:
    r = httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_admin_key_is_stored_hashed(server: RunningServer) -> None:
    import hashlib

    from conftest import ADMIN_KEY, database_rows

    rows = [r for r in database_rows(server, "api_keys") if r["is_server_admin"]]
    assert len(rows) == 1
    row = rows[0]
    assert ADMIN_KEY not in repr(row)
    assert row["key_hash"] == hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    # a key the operator chose keeps only the public tag in clear, not its first 12 characters
    assert row["prefix"] == "sk-bst-"
    assert "admin" in row["permissions"]
