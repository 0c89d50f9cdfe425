"""What an outsider without a key can see: /health's liveness but not its details, and a
sign-in page that shows no text of the caller's choosing."""

from __future__ import annotations

import httpx

from conftest import ADMIN_KEY, MODEL, RunningServer, bearer, make_tenant


def test_health_is_liveness_without_a_key(server: RunningServer) -> None:
    r = httpx.get(server.base_url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert MODEL not in r.text


def test_health_details_need_a_valid_key(server: RunningServer) -> None:
    _, tenant = make_tenant(server.api, name="health-reader")
    for key in (ADMIN_KEY, tenant["key"]):
        body = httpx.get(server.base_url + "/health", headers=bearer(key)).json()
        assert body["status"] == "ok"
        assert {"running_sequences", "waiting_requests"} <= set(body["models"][MODEL])
    r = httpx.get(server.base_url + "/health", headers=bearer("sk-bst-wrong"))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_sign_in_page_shows_only_known_reasons(server: RunningServer) -> None:
    planted = "Your account is locked. Call +1 555 0100 to unlock it"
    r = httpx.get(server.base_url + "/dashboard/login", params={"reason": planted})
    assert r.status_code == 200
    assert "Call +1 555" not in r.text and "Your session ended" not in r.text
    r = httpx.get(server.base_url + "/dashboard/login", params={"reason": "api_key_revoked"})
    assert "Your session ended: this API key has been revoked." in r.text
