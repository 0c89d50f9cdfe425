"""The audit log against a real server: every kind of event recorded by doing the real thing
(through the API, the dashboard and the command line), who did it and from where, the list's
pagination and filters, organisations kept apart, and no key material in it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

import httpx
import openai
import pytest

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, database_rows, start_server,
                      stop_server)
from ftdata import duck_examples, write_jsonl
from tiny_llama import build_tiny_llama

from bastion.tenancy.keys import ENV_ADMIN_NAME

UA = "audit-test/1.0"
DASHBOARD_UA = "audit-dashboard/1.0"
EVERY_TYPE = {"api_key.created", "api_key.deleted", "organization.created",
              "organization.updated", "organization.deleted", "plan.updated",
              "rate_limit.updated", "model.uploaded", "model.deleted",
              "fine_tuning.job.created", "fine_tuning.job.cancelled"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # no worker: a fine-tuning job stays queued until it is cancelled
    s = start_server(tmp_path_factory.mktemp("audit"), "--parallel", "2", "--no-worker")
    yield s
    stop_server(s)


def call(method: str, url: str, key: str, **kw: object) -> httpx.Response:
    headers = {**bearer(key), "User-Agent": UA, **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.request(method, url, headers=headers, timeout=300, **kw)  # type: ignore[arg-type]


def audit_page(srv: RunningServer, key: str, org: str, **params: object) -> httpx.Response:
    return httpx.get(f"{srv.api}/organizations/{org}/audit_logs", headers=bearer(key),
                     params=params, timeout=60)  # type: ignore[arg-type]


def audit_log(srv: RunningServer, key: str, org: str, **params: object) -> list[dict]:
    r = audit_page(srv, key, org, limit=100, **params)
    assert r.status_code == 200, r.text
    assert r.json()["has_more"] is False
    return r.json()["data"]


def only(events: list[dict], event_type: str) -> dict:
    found = [e for e in events if e["type"] == event_type]
    assert len(found) == 1, (event_type, [e["type"] for e in events])
    return found[0]


def admin_key_id(srv: RunningServer) -> tuple[str, str]:
    """(the server administrator's organisation, its key's id)."""
    home = call("GET", f"{srv.api}/organizations", ADMIN_KEY).json()["data"][0]["id"]
    keys = call("GET", f"{srv.api}/organizations/{home}/api-keys", ADMIN_KEY).json()["data"]
    return home, next(k["id"] for k in keys
                      if k["name"] == ENV_ADMIN_NAME and k["revoked_at"] is None)


@pytest.fixture(scope="module")
def story(srv: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every audited change, done for real, in order; what each returned."""
    api = srv.api
    out: dict = {"raw_keys": []}
    out["home"], out["admin_id"] = admin_key_id(srv)
    org = call("POST", f"{api}/organizations", ADMIN_KEY,
               json={"name": "Audited", "plan": "seed"}).json()["id"]
    out["org"] = org
    boss = call("POST", f"{api}/organizations/{org}/api-keys", ADMIN_KEY,
                json={"name": "boss", "permissions": ["admin"]}).json()
    out["boss"], out["boss_id"] = boss["key"], boss["id"]
    out["raw_keys"].append(boss)
    key = boss["key"]
    r = call("PATCH", f"{api}/organizations/{org}", key, json={"name": "Audited Ltd"})
    assert r.status_code == 200, r.text
    r = call("PATCH", f"{api}/organizations/{org}", key, json={"plan": "spark"})  # a lower plan
    assert r.status_code == 200, r.text
    r = call("PATCH", f"{api}/organizations/{org}", ADMIN_KEY,
             json={"plan": "scale", "limits": {"concurrent_requests": 3}},
             headers={"x-request-id": "req-audit-raise"})
    assert r.status_code == 200, r.text
    temp = call("POST", f"{api}/organizations/{org}/api-keys", key,
                json={"name": "temp", "permissions": ["inference"], "rate_limit": 60},
                headers={"x-request-id": "req-audit-key"}).json()
    out["temp_id"] = temp["id"]
    out["raw_keys"].append(temp)
    for _ in range(2):  # revoking a revoked key changes nothing: one event
        r = call("DELETE", f"{api}/organizations/{org}/api-keys/{temp['id']}", key)
        assert r.status_code == 200, r.text
    # a model uploaded and deleted
    tiny = build_tiny_llama(tmp_path_factory.mktemp("audit-tiny"))
    files = {name: (f"{name}.json" if name != "file" else "model.safetensors",
                    (tiny / path).read_bytes())
             for name, path in (("file", "model.safetensors"), ("config", "config.json"),
                                ("tokenizer", "tokenizer.json"),
                                ("tokenizer_config", "tokenizer_config.json"))}
    template = tiny / "chat_template.jinja"  # where transformers 5 keeps it
    if template.exists():
        files["chat_template"] = (template.name, template.read_bytes())
    r = call("POST", f"{api}/models", key, data={"model_id": "audited-model"}, files=files)
    assert r.status_code == 200, r.text
    r = call("DELETE", f"{api}/models/audited-model", key)
    assert r.status_code == 200, r.text
    # a fine-tuning job created and cancelled
    sdk = openai.OpenAI(base_url=api, api_key=key, max_retries=0, timeout=300,
                        default_headers={"User-Agent": UA})
    data = write_jsonl(tmp_path_factory.mktemp("audit-ft") / "t.jsonl", duck_examples(16))
    out["file"] = sdk.files.create(file=open(data, "rb"), purpose="fine-tune").id
    job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=out["file"], suffix="audit")
    out["job"] = job.id
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    sdk.fine_tuning.jobs.cancel(job.id)  # already cancelled: no second event
    # an organisation deleted
    doomed = call("POST", f"{api}/organizations", ADMIN_KEY,
                  json={"name": "Doomed", "plan": "spark"}).json()["id"]
    assert call("DELETE", f"{api}/organizations/{doomed}", ADMIN_KEY).status_code == 200
    out["doomed"] = doomed
    return out


def test_every_change_is_recorded_with_who_and_where(srv: RunningServer, story: dict) -> None:
    org, boss_id, admin_id = story["org"], story["boss_id"], story["admin_id"]
    events = audit_log(srv, story["boss"], org)
    deleted = audit_log(srv, ADMIN_KEY, story["doomed"])
    assert {e["type"] for e in events + deleted} == EVERY_TYPE
    assert [e["type"] for e in deleted] == ["organization.deleted", "organization.created"]
    assert all(e["organization_id"] == org and e["object"] == "organization.audit_log"
               and e["id"].startswith("audit_log-") for e in events)
    times = [e["effective_at"] for e in events]
    assert times == sorted(times, reverse=True)  # newest first

    def by_key(key_id: str, kind: str) -> dict:
        return {"type": "api_key", "api_key": {"id": key_id, "type": kind,
                                               "ip_address": "127.0.0.1", "user_agent": UA}}

    created = only(events, "organization.created")
    assert created["organization.created"] == {"id": org, "data": {"name": "Audited",
                                                                   "plan": "seed"}}
    assert created["actor"] == by_key(admin_id, "server_admin")
    assert created["request_id"].startswith("req_")
    keys_made = [e for e in events if e["type"] == "api_key.created"]
    assert [e["api_key.created"] for e in keys_made] == [
        {"id": story["temp_id"], "data": {"name": "temp", "permissions": ["inference"],
                                          "rate_limit": 60}},
        {"id": boss_id, "data": {"name": "boss", "permissions": ["admin"], "rate_limit": None}}]
    assert keys_made[0]["actor"] == by_key(boss_id, "organization")
    assert keys_made[0]["request_id"] == "req-audit-key"
    assert keys_made[1]["actor"] == by_key(admin_id, "server_admin")
    revoked = only(events, "api_key.deleted")
    assert revoked["api_key.deleted"] == {"id": story["temp_id"], "data": {"name": "temp"}}
    renamed = only(events, "organization.updated")
    assert renamed["organization.updated"]["data"] == {"name": {"from": "Audited",
                                                                "to": "Audited Ltd"}}
    plans = [e for e in events if e["type"] == "plan.updated"]
    assert [(e["plan.updated"]["data"], e["actor"]["api_key"]["id"]) for e in plans] == [
        ({"from": "spark", "to": "scale"}, admin_id), ({"from": "seed", "to": "spark"}, boss_id)]
    limits = only(events, "rate_limit.updated")
    assert limits["rate_limit.updated"] == {"id": org, "data": {
        "from": {}, "to": {"concurrent_requests": 3}}}
    assert limits["request_id"] == plans[0]["request_id"] == "req-audit-raise"
    uploaded = only(events, "model.uploaded")
    assert uploaded["model.uploaded"]["id"] == "audited-model"
    assert uploaded["model.uploaded"]["data"]["format"] == "safetensors"
    assert uploaded["model.uploaded"]["data"]["bytes"] > 0
    assert only(events, "model.deleted")["model.deleted"] == {
        "id": "audited-model", "data": {"source": "uploaded"}}
    job = only(events, "fine_tuning.job.created")
    assert job["fine_tuning.job.created"]["id"] == story["job"]
    assert job["fine_tuning.job.created"]["data"] == {
        "model": MODEL, "training_file": story["file"], "validation_file": None,
        "suffix": "audit", "method": "lora"}
    assert job["actor"]["api_key"]["id"] == boss_id  # through the SDK (its own User-Agent)
    assert only(events, "fine_tuning.job.cancelled")["fine_tuning.job.cancelled"] == {
        "id": story["job"], "data": {"status_before": "queued"}}
    assert only(deleted, "organization.deleted")["actor"] == by_key(admin_id, "server_admin")


def test_the_server_records_its_own_admin_key(srv: RunningServer, story: dict) -> None:
    first = audit_log(srv, ADMIN_KEY, story["home"], **{"event_types[]": "api_key.created"})[-1]
    assert first["actor"] == {"type": "system"}
    assert first["api_key.created"]["id"] == story["admin_id"]
    assert first["api_key.created"]["data"]["server_admin"] is True


def test_pages_and_filters(srv: RunningServer, story: dict) -> None:
    key, org = story["boss"], story["org"]
    everything = [e["id"] for e in audit_log(srv, key, org)]
    assert len(everything) >= 10
    seen, after, pages = [], None, 0
    while True:
        r = audit_page(srv, key, org, limit=3, **({"after": after} if after else {}))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and len(body["data"]) <= 3
        ids = [e["id"] for e in body["data"]]
        assert body["first_id"] == ids[0] and body["last_id"] == ids[-1]
        seen += ids
        pages += 1
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert seen == everything and pages == -(-len(everything) // 3)
    # OpenAI's event_types[] filter, one type or several
    chosen = audit_log(srv, key, org, **{"event_types[]": ["plan.updated", "api_key.deleted"]})
    assert sorted(e["type"] for e in chosen) == ["api_key.deleted", "plan.updated",
                                                 "plan.updated"]
    assert [e["type"] for e in audit_log(srv, key, org, **{"event_types[]": "model.deleted"})] \
        == ["model.deleted"]
    by_admin = audit_log(srv, key, org, **{"actor_ids[]": story["admin_id"]})
    assert {e["actor"]["api_key"]["id"] for e in by_admin} == {story["admin_id"]}
    assert len(by_admin) == 4  # the organisation, its first key, the plan and the limits
    for params, param in (({"event_types[]": "api_key.stolen"}, "event_types[]"),
                          ({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                          ({"after": "audit_log-nope"}, "after")):
        r = audit_page(srv, key, org, **params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["param"] == param, r.json()
    # the API at the root, as every other route
    r = httpx.get(f"{srv.base_url}/organizations/{org}/audit_logs", headers=bearer(key))
    assert r.status_code == 200 and [e["id"] for e in r.json()["data"]] == everything[:20]


def test_other_organisations_cannot_read_it(srv: RunningServer, story: dict) -> None:
    api, org = srv.api, story["org"]
    other = call("POST", f"{api}/organizations", ADMIN_KEY,
                 json={"name": "Nosy", "plan": "seed"}).json()["id"]
    nosy = call("POST", f"{api}/organizations/{other}/api-keys", ADMIN_KEY,
                json={"name": "nosy admin", "permissions": ["admin"]}).json()["key"]
    for target in (org, story["doomed"], "org-does-not-exist"):
        r = audit_page(srv, nosy, target)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "organization_not_found"
    assert story["org"] not in audit_page(srv, nosy, other).text
    reader = call("POST", f"{api}/organizations/{org}/api-keys", story["boss"],
                  json={"name": "reader", "permissions": ["inference", "training",
                                                          "models"]}).json()["key"]
    r = audit_page(srv, reader, org)
    assert r.status_code == 403 and "'admin'" in r.json()["error"]["message"]
    r = httpx.get(f"{api}/organizations/{org}/audit_logs")
    assert r.status_code == 401
    # a deleted organisation's log stays readable by the server administrator
    assert audit_page(srv, ADMIN_KEY, story["doomed"]).status_code == 200


def command(srv: RunningServer, *args: str) -> str:
    env = {**os.environ, "BASTION_DATABASE_URL": srv.database_url}
    done = subprocess.run([sys.executable, "-m", "bastion.cli", *args, "--data-dir",
                           str(srv.data_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_the_command_line_is_audited_too(srv: RunningServer, story: dict) -> None:
    org = command(srv, "orgs", "create", "--name", "From the shell", "--plan", "seed")
    raw = command(srv, "keys", "create", "--org", org, "--name", "shell key",
                  "--permissions", "inference")
    key_id = next(k["id"] for k in call("GET", f"{srv.api}/organizations/{org}/api-keys",
                                        ADMIN_KEY).json()["data"] if k["name"] == "shell key")
    command(srv, "keys", "revoke", key_id)
    events = audit_log(srv, ADMIN_KEY, org)
    assert [e["type"] for e in events] == ["api_key.deleted", "api_key.created",
                                           "organization.created"]
    for e in events:
        assert e["actor"]["type"] == "cli" and e["request_id"] is None
        assert re.fullmatch(r"bastion-cli \(.+@.+\)", e["actor"]["cli"]["user_agent"])
    assert events[1]["api_key.created"] == {"id": key_id, "data": {
        "name": "shell key", "permissions": ["inference"], "rate_limit": None}}
    assert raw[12:] not in json.dumps(events)
    story["raw_keys"].append({"key": raw, "prefix": raw[:12]})


@contextmanager
def sign_in(srv: RunningServer, key: str) -> Iterator[httpx.Client]:
    """A dashboard session of `key`, signed in as a browser does (HTTP only, no browser)."""
    with httpx.Client(base_url=srv.base_url, timeout=120,
                      headers={"User-Agent": DASHBOARD_UA}) as web:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', web.get("/dashboard/login").text)
        assert csrf is not None
        r = web.post("/dashboard/login", data={"api_key": key, "csrf_token": csrf.group(1)})
        assert r.status_code == 303, r.text
        yield web


def form_token(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def test_dashboard_changes_are_audited_and_listed(srv: RunningServer, story: dict) -> None:
    org, boss_id = story["org"], story["boss_id"]
    with sign_in(srv, story["boss"]) as web:
        token = form_token(web.get("/dashboard/keys").text)
        made = web.post("/dashboard/keys", data={"name": "made in the dashboard",
                                                 "permissions": "inference",
                                                 "csrf_token": token})
        assert made.status_code == 200
        created = re.search(r'value="(sk-bst-[^"]+)"', made.text)
        assert created is not None, made.text
        story["raw_keys"].append({"key": created.group(1), "prefix": created.group(1)[:12]})
        event = audit_log(srv, story["boss"], org, **{"event_types[]": "api_key.created"})[0]
        assert event["api_key.created"]["data"]["name"] == "made in the dashboard"
        assert event["actor"] == {"type": "session", "session": {
            "user": {"id": boss_id, "type": "organization"}, "ip_address": "127.0.0.1",
            "user_agent": DASHBOARD_UA}}
        new_id = event["api_key.created"]["id"]
        r = web.post(f"/dashboard/keys/{new_id}/revoke", data={"csrf_token": token})
        assert r.status_code == 303
        assert audit_log(srv, story["boss"], org, **{"event_types[]": "api_key.deleted"}
                         )[0]["actor"]["type"] == "session"

        page = web.get("/dashboard/audit-log")
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'href="/dashboard/audit-log" aria-current="page"' in page.text
        shown = re.findall(r'data-event-id="([^"]+)" data-event-type="([^"]+)"', page.text)
        listed = audit_log(srv, story["boss"], org)
        assert shown == [(e["id"], e["type"]) for e in listed]
        assert "made in the dashboard" in page.text
        assert '<span class="muted small">Dashboard</span>' in page.text
        assert "boss" in page.text and DASHBOARD_UA in page.text and "127.0.0.1" in page.text
        plans = web.get("/dashboard/audit-log", params={"type": "plan.updated"}).text
        assert {t for _, t in re.findall(r'data-event-id="([^"]+)" data-event-type="([^"]+)"',
                                         plans)} == {"plan.updated"}
        assert "&#34;to&#34;: &#34;scale&#34;" in plans or '"to": "scale"' in plans
    # the server administrator's plan change on the Organisations page: a session of that key
    with sign_in(srv, ADMIN_KEY) as web:
        token = form_token(web.get("/dashboard/orgs").text)
        r = web.post(f"/dashboard/orgs/{org}/plan", data={"plan": "seed", "csrf_token": token})
        assert r.status_code == 303, r.text
    changed = audit_log(srv, story["boss"], org, **{"event_types[]": "plan.updated"})[0]
    assert changed["plan.updated"]["data"] == {"from": "scale", "to": "seed"}
    assert changed["actor"]["session"]["user"] == {"id": story["admin_id"],
                                                   "type": "server_admin"}
    # a key without 'admin' has no audit log page, nor a link to it
    reader = call("POST", f"{srv.api}/organizations/{org}/api-keys", story["boss"],
                  json={"name": "page reader", "permissions": ["inference"]}).json()["key"]
    with sign_in(srv, reader) as web:
        assert web.get("/dashboard/audit-log").status_code == 403
        assert "/dashboard/audit-log" not in web.get("/dashboard/").text


def test_no_key_material_in_the_audit_log(srv: RunningServer, story: dict) -> None:
    """Run last: every key the tests above created, searched for in the table and the API."""
    rows = database_rows(srv, "audit_events")
    dump = repr(rows) + "".join(json.dumps(audit_log(srv, ADMIN_KEY, org))
                                for org in {r["org_id"] for r in rows})
    assert len(story["raw_keys"]) >= 2  # 4 when the CLI and dashboard tests ran first
    for key in story["raw_keys"]:
        assert key["key"][len(key["prefix"]):] not in dump
        assert key["prefix"] not in dump  # not even the visible prefix: keys are named by id
    assert ADMIN_KEY not in dump and ADMIN_KEY[:12] not in dump
