"""Organisations and API keys: the server admin, organisation admins, permissions, isolation."""

from __future__ import annotations

import json
import re
import socket

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, MODEL, RunningServer, bearer

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tenants(server: RunningServer) -> dict:
    """Two organisations, each with an admin key, plus narrower keys in the second."""
    api = server.api
    admin = bearer(ADMIN_KEY)
    out: dict = {}
    for name in ("alpha", "beta"):
        org = httpx.post(f"{api}/organizations", headers=admin,
                         json={"name": name, "plan": "seed"}).json()
        key = httpx.post(f"{api}/organizations/{org['id']}/api-keys", headers=admin,
                         json={"name": f"{name} admin", "permissions": ["admin"]}).json()
        out[name] = {"org": org, "admin": key["key"], "admin_id": key["id"]}
    beta = out["beta"]["org"]["id"]
    for perm in ("inference", "training"):
        k = httpx.post(f"{api}/organizations/{beta}/api-keys", headers=bearer(out["beta"]["admin"]),
                       json={"name": perm, "permissions": [perm], "rate_limit": 1000}).json()
        out["beta"][perm] = k["key"]
        out["beta"][perm + "_id"] = k["id"]
    return out


def test_created_key_is_shown_once(server: RunningServer, tenants: dict) -> None:
    org = tenants["alpha"]["org"]
    assert org["object"] == "organization" and org["plan"] == "seed"
    assert org["limits"] == {"concurrent_requests": 20, "tokens_per_request": 4096,
                             "tokens_per_hour": 100000, "fine_tuning_jobs": 3}
    r = httpx.post(f"{server.api}/organizations/{org['id']}/api-keys",
                   headers=bearer(tenants["alpha"]["admin"]),
                   json={"name": "Production Key", "permissions": ["inference", "training"],
                         "rate_limit": 1000})
    assert r.status_code == 200
    created = r.json()
    assert created["key"].startswith("sk-bst-") and created["key"].startswith(created["prefix"])
    assert created["permissions"] == ["inference", "training"] and created["rate_limit"] == 1000
    listed = httpx.get(f"{server.api}/organizations/{org['id']}/api-keys",
                       headers=bearer(tenants["alpha"]["admin"])).json()["data"]
    assert created["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)
    assert created["key"] not in httpx.get(f"{server.api}/organizations/{org['id']}/api-keys",
                                           headers=bearer(tenants["alpha"]["admin"])).text
    works = openai.OpenAI(base_url=server.api, api_key=created["key"], max_retries=0)
    assert works.chat.completions.create(model=MODEL, messages=HI, max_tokens=1).choices


def test_organisations_are_isolated(server: RunningServer, tenants: dict) -> None:
    a, b = tenants["alpha"], tenants["beta"]
    as_beta = bearer(b["admin"])
    listed = httpx.get(f"{server.api}/organizations", headers=as_beta).json()["data"]
    assert [o["id"] for o in listed] == [b["org"]["id"]]
    other = a["org"]["id"]
    for method, path in [("GET", f"/organizations/{other}"),
                         ("PATCH", f"/organizations/{other}"),
                         ("GET", f"/organizations/{other}/api-keys"),
                         ("POST", f"/organizations/{other}/api-keys"),
                         ("DELETE", f"/organizations/{other}/api-keys/{a['admin_id']}")]:
        body = {"name": "x", "permissions": ["inference"]} if method == "POST" else {}
        r = httpx.request(method, server.api + path, headers=as_beta, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    # a key id of another organisation does not exist either
    r = httpx.delete(f"{server.api}/organizations/{b['org']['id']}/api-keys/{a['admin_id']}",
                     headers=as_beta)
    assert r.status_code == 404
    assert httpx.get(f"{server.api}/organizations", headers=bearer(ADMIN_KEY)).json()["data"]


def test_server_admin_powers(server: RunningServer, tenants: dict) -> None:
    b = tenants["beta"]
    org = b["org"]["id"]
    r = httpx.post(f"{server.api}/organizations", headers=bearer(b["admin"]),
                   json={"name": "mine", "plan": "dedicated"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "authorization_error"
    r = httpx.patch(f"{server.api}/organizations/{org}", headers=bearer(b["admin"]),
                    json={"plan": "scale"})
    assert r.status_code == 403
    assert r.json()["error"]["message"] == ("Only the server administrator can raise an "
                                            "organization's plan (from 'seed' to 'scale').")
    r = httpx.patch(f"{server.api}/organizations/{org}", headers=bearer(b["admin"]),
                    json={"limits": {"tokens_per_hour": 10**9}})
    assert r.status_code == 403
    r = httpx.patch(f"{server.api}/organizations/{org}", headers=bearer(ADMIN_KEY),
                    json={"plan": "scale", "limits": {"concurrent_requests": 7}})
    assert r.status_code == 200
    assert r.json()["plan"] == "scale"
    assert r.json()["limits"] == {"concurrent_requests": 7, "tokens_per_request": 8192,
                                  "tokens_per_hour": None, "fine_tuning_jobs": 10}
    r = httpx.patch(f"{server.api}/organizations/{org}", headers=bearer(b["admin"]),
                    json={"plan": "seed", "name": "beta renamed"})
    assert r.status_code == 200 and r.json()["plan"] == "seed" and r.json()["name"] == "beta renamed"


def test_permissions_are_enforced(server: RunningServer, tenants: dict) -> None:
    b = tenants["beta"]
    training = openai.OpenAI(base_url=server.api, api_key=b["training"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        training.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert exc.value.body == {"message": "This API key lacks the 'inference' permission needed "
                                         "for this endpoint.", "type": "authorization_error",
                              "code": "insufficient_permissions", "param": None}
    with pytest.raises(openai.PermissionDeniedError):
        training.completions.create(model=MODEL, prompt="x", max_tokens=1)
    inference = openai.OpenAI(base_url=server.api, api_key=b["inference"], max_retries=0)
    assert inference.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
    assert [m.id for m in inference.models.list().data] == [
        "smollm2-135m-instruct", MODEL, "all-minilm-l6-v2"]
    r = httpx.get(f"{server.api}/organizations/{b['org']['id']}/api-keys",
                  headers=bearer(b["inference"]))
    assert r.status_code == 403 and "'admin'" in r.json()["error"]["message"]


def test_revocation_is_immediate(server: RunningServer, tenants: dict) -> None:
    a = tenants["alpha"]
    org = a["org"]["id"]
    key = httpx.post(f"{server.api}/organizations/{org}/api-keys", headers=bearer(a["admin"]),
                     json={"name": "short-lived", "permissions": ["inference"]}).json()
    client = openai.OpenAI(base_url=server.api, api_key=key["key"], max_retries=0)
    assert client.models.list().data
    r = httpx.delete(f"{server.api}/organizations/{org}/api-keys/{key['id']}",
                     headers=bearer(a["admin"]))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError) as exc:
        client.models.list()
    assert exc.value.body["code"] == "api_key_revoked"


def test_deleted_organisation_keys_stop_working(server: RunningServer) -> None:
    admin = bearer(ADMIN_KEY)
    org = httpx.post(f"{server.api}/organizations", headers=admin,
                     json={"name": "doomed", "plan": "spark"}).json()
    key = httpx.post(f"{server.api}/organizations/{org['id']}/api-keys", headers=admin,
                     json={"name": "k", "permissions": ["inference"]}).json()["key"]
    assert httpx.get(f"{server.api}/models", headers=bearer(key)).status_code == 200
    assert httpx.delete(f"{server.api}/organizations/{org['id']}", headers=admin).status_code == 200
    r = httpx.get(f"{server.api}/models", headers=bearer(key))
    assert r.status_code == 401 and r.json()["error"]["code"] == "organization_deleted"
    assert httpx.get(f"{server.api}/organizations/{org['id']}", headers=admin).status_code == 404


@pytest.mark.parametrize("body,param", [
    ({"name": "x", "permissions": ["root"]}, "permissions[0]"),
    ({"name": "x", "permissions": []}, "permissions"),
    ({"name": "x", "permissions": ["inference"], "rate_limit": -5}, "rate_limit"),
    ({"name": "x", "permissions": ["inference"], "rate_limit": 10**12}, "rate_limit"),
    ({"name": "", "permissions": ["inference"]}, "name"),
    ({"permissions": ["inference"]}, "name"),
])
def test_bad_key_requests(server: RunningServer, tenants: dict, body: dict, param: str) -> None:
    org = tenants["alpha"]["org"]["id"]
    r = httpx.post(f"{server.api}/organizations/{org}/api-keys",
                   headers=bearer(tenants["alpha"]["admin"]), json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_bad_plan_is_400(server: RunningServer) -> None:
    r = httpx.post(f"{server.api}/organizations", headers=bearer(ADMIN_KEY),
                   json={"name": "x", "plan": "platinum"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "plan"


@pytest.mark.parametrize("key", ["' OR '1'='1", "sk-bst-" + "a" * 10_000, "sk-bst-\u00e9t\u00e9",
                                 ADMIN_KEY[:-1], ADMIN_KEY.upper()])
def test_malformed_keys(server: RunningServer, key: str) -> None:
    r = httpx.get(f"{server.api}/models", headers={"Authorization": f"Bearer {key}".encode()})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("key", [b"sk-bst-\x00abc", b"sk-bst-x\x7f", b"sk-bst-\x01x"])
def test_control_bytes_in_a_key(server: RunningServer, key: bytes) -> None:
    """Sent raw (clients refuse to): the HTTP parser refuses the header (400) or
    authentication refuses the key (401), and either way the body is OpenAI's error."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key +
                  b"\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    error = json.loads(body)["error"]
    assert (status, error["type"]) in ((400, "invalid_request_error"),
                                       (401, "authentication_error")), reply
    assert error["message"] and (status == 401 or error["code"] == "invalid_http_request")


def test_every_route_requires_a_key(server: RunningServer) -> None:
    """Walk the whole route table: only /health and /ready answer without a key. (The dashboard's
    pages authenticate with a session instead: test_dashboard walks those.)"""
    from bastion.app import create_app

    app = create_app()
    allow = {"/health", "/ready"}
    seen = 0
    for included in app.routes:
        for route in getattr(included, "original_router", included).routes:
            if route.path.startswith("/dashboard") or not hasattr(route, "methods"):
                continue  # session-authenticated pages; WebSocket routes (test_ws)
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            for method in route.methods:
                r = httpx.request(method, server.base_url + path, json={})
                if route.path in allow:
                    assert r.status_code == 200
                    continue
                seen += 1
                assert r.status_code == 401, (method, route.path, r.status_code)
                assert r.json()["error"]["code"] == "missing_api_key"
    assert seen >= 12


def test_key_material_never_logged_or_stored(server: RunningServer) -> None:
    """Use a fresh key every way it can be used, then search the server's log and the whole
    database for it: only its hash and its short prefix may be found."""
    import hashlib

    from conftest import database_rows

    admin = bearer(ADMIN_KEY)
    org = httpx.post(f"{server.api}/organizations", headers=admin,
                     json={"name": "secrets", "plan": "spark"}).json()["id"]
    created = httpx.post(f"{server.api}/organizations/{org}/api-keys", headers=admin,
                         json={"name": "s", "permissions": ["inference"]}).json()
    raw = created["key"]
    h = bearer(raw)
    httpx.post(f"{server.api}/completions", headers=h, json={"model": MODEL, "prompt": "x",
                                                              "max_tokens": 1})
    httpx.post(f"{server.api}/completions", headers=h, json={"model": "nope", "prompt": "x"})
    httpx.get(f"{server.api}/organizations/{org}/api-keys", headers=h)  # 403
    httpx.delete(f"{server.api}/organizations/{org}/api-keys/{created['id']}", headers=admin)
    httpx.get(f"{server.api}/models", headers=h)  # 401 revoked
    secret = raw[len(created["prefix"]):]
    assert secret not in server.log()
    dump = "\n".join(repr(database_rows(server, t))
                     for t in ("organizations", "api_keys", "usage_records", "audit_events"))
    raw_files = "".join(p.read_bytes().decode("latin-1")
                        for p in server.data_dir.glob("bastion.db*"))  # SQLite, WAL included
    assert secret not in dump and secret not in raw_files
    assert hashlib.sha256(raw.encode()).hexdigest() in dump


def test_org_admin_cannot_touch_the_server_admin_key(server: RunningServer) -> None:
    """A key with 'admin' in the server administrator's own organisation still cannot see or
    revoke the server administrator's key."""
    admin = bearer(ADMIN_KEY)
    home = httpx.get(f"{server.api}/organizations", headers=admin).json()["data"][0]["id"]
    deputy = httpx.post(f"{server.api}/organizations/{home}/api-keys", headers=admin,
                        json={"name": "deputy", "permissions": ["admin"]}).json()
    all_keys = httpx.get(f"{server.api}/organizations/{home}/api-keys", headers=admin).json()
    server_key = next(k for k in all_keys["data"]
                      if k["name"] == "Admin key (BASTION_ADMIN_KEY)")
    seen = httpx.get(f"{server.api}/organizations/{home}/api-keys",
                     headers=bearer(deputy["key"])).json()["data"]
    assert server_key["id"] not in [k["id"] for k in seen]
    r = httpx.delete(f"{server.api}/organizations/{home}/api-keys/{server_key['id']}",
                     headers=bearer(deputy["key"]))
    assert r.status_code == 404
    assert httpx.get(f"{server.api}/models", headers=admin).status_code == 200
