"""The dashboard in a real headless Chromium against a real server and the bundled model: sign
in, keys shown once and revoked, permissions, the playground's stream, usage, CSRF. Every page
is saved as a screenshot in test-artifacts/ for a person to look at."""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import datetime, timezone
from typing import Iterator

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, MODEL, RunningServer, bearer, make_tenant
from dashboard_browser import (CHROMIUM, Page, browser, csrf_of, session_cookie, shot, sign_in,
                               sync_api)

EMBEDDINGS = "all-minilm-l6-v2"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: "
                                "`make system-test-deps` installs Debian's chromium")
expect = sync_api.expect
__all__ = ["browser"]  # the browser fixture, shared by the dashboard tests


@pytest.fixture(scope="module")
def tenant(server: RunningServer) -> dict:
    """An organisation of its own (so usage numbers are its own), with an admin key and an
    inference-only key."""
    org, admin = make_tenant(server.api, "seed", permissions=("admin",), name="Dashboard Co")
    r = httpx.post(f"{server.api}/organizations/{org}/api-keys", headers=bearer(admin["key"]),
                   json={"name": "playground only", "permissions": ["inference"]})
    assert r.status_code == 200, r.text
    return {"org": org, "admin": admin["key"], "inference": r.json()["key"],
            "inference_id": r.json()["id"]}


@pytest.fixture(scope="module")
def admin_page(browser: object, server: RunningServer, tenant: dict) -> Iterator[Page]:
    page = sign_in(browser, server, tenant["admin"])
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def inference_page(browser: object, server: RunningServer, tenant: dict) -> Iterator[Page]:
    page = sign_in(browser, server, tenant["inference"])
    yield page
    page.context.close()


def api_usage(server: RunningServer, key: str, start: int) -> dict:
    r = httpx.get(f"{server.api}/usage", headers=bearer(key), params={"start_time": start})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def today_start() -> int:
    now = datetime.now(timezone.utc)
    return int(now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())


# --- signing in -----------------------------------------------------------------------------------

def test_wrong_key_cannot_sign_in(browser: object, server: RunningServer) -> None:
    context = browser.new_context(base_url=server.base_url)  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto("/dashboard/")
    assert page.url.startswith(server.base_url + "/dashboard/login")  # no session: sign in first
    shot(page, "login")
    page.fill("#api_key", "sk-bst-this-is-not-a-key-of-this-server")
    with page.expect_response("**/dashboard/login") as posted:
        page.click("button[type=submit]")
    assert posted.value.status == 401
    expect(page.locator("#login-error")).to_contain_text("Incorrect API key provided")
    shot(page, "login-error")
    # the sign-in form's token lives in a cookie of its own, scoped to the sign-in page, so
    # that a visit arriving without the session cookie cannot overwrite a good session
    assert [(c["name"], c["path"]) for c in context.cookies()] == [("bastion_login",
                                                                    "/dashboard/login")]
    page.goto("/dashboard/keys")
    assert "/dashboard/login" in page.url
    context.close()


def test_sign_in_shows_overview(admin_page: Page, server: RunningServer, tenant: dict) -> None:
    client = openai.OpenAI(base_url=server.api, api_key=tenant["admin"], max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=4, temperature=0)
    admin_page.goto("/dashboard/")
    expect(admin_page.locator(".who .org")).to_have_text("Dashboard Co")
    expect(admin_page.locator("h2#limits")).to_contain_text("seed")
    expect(admin_page.locator(".gauge").nth(1)).to_contain_text("of 100,000 tokens")
    today = api_usage(server, tenant["admin"], today_start())
    assert today["requests"] >= 1
    shown = admin_page.locator("[data-stat=tokens-today]").inner_text().replace(",", "")
    assert int(shown) == today["total_tokens"]
    expect(admin_page.locator("#busiest + table")).to_contain_text(MODEL)
    shot(admin_page, "overview")
    assert [c["name"] for c in admin_page.context.cookies()] == ["bastion_session"]
    cookie = next(c for c in admin_page.context.cookies() if c["name"] == "bastion_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > time.time()
    assert tenant["admin"] not in cookie["value"]


# --- keys ---------------------------------------------------------------------------------------

def test_create_key_shown_once_works_then_revoked(browser: object, admin_page: Page,
                                                  server: RunningServer, tenant: dict) -> None:
    page = admin_page
    page.goto("/dashboard/keys")
    page.fill("#key-name", "Browser key")
    page.check("input[name=permissions][value=inference]")
    page.fill("#key-rate", "100")
    page.click("form[action='/dashboard/keys'] button[type=submit]")
    created = page.locator("[data-testid=created-key]")
    expect(created).to_be_visible()
    expect(page.locator(".created")).to_contain_text("you will not see this again")
    raw = created.input_value()
    assert raw.startswith("sk-bst-") and len(raw) > 40
    shot(page, "keys-created")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == raw

    # it works against the API
    works = openai.OpenAI(base_url=server.api, api_key=raw, max_retries=0)
    assert works.chat.completions.create(model=MODEL, max_tokens=1,
                                         messages=[{"role": "user", "content": "Hi"}]).choices
    # and is never shown again
    page.goto("/dashboard/keys")
    assert raw not in page.content()
    row = page.locator("tr", has_text="Browser key")
    expect(row).to_contain_text(raw[:12])
    expect(row).to_contain_text("100/min")

    # someone signed in with that key is signed out by its revocation
    other = sign_in(browser, server, raw)

    page.once("dialog", lambda d: d.dismiss())  # "Cancel" in the confirmation keeps the key
    row.get_by_role("button", name="Revoke Browser key").click()
    listed = httpx.get(f"{server.api}/organizations/{tenant['org']}/api-keys",
                       headers=bearer(tenant["admin"])).json()["data"]
    assert next(k for k in listed if k["name"] == "Browser key")["revoked_at"] is None

    messages: list[str] = []
    page.once("dialog", lambda d: (messages.append(d.message), d.accept()))
    with page.expect_navigation():
        row.get_by_role("button", name="Revoke Browser key").click()
    assert "Revoke the key" in messages[0]
    expect(page.locator("tr.revoked", has_text="Browser key")).to_be_visible()
    shot(page, "keys")
    with pytest.raises(openai.AuthenticationError) as exc:
        works.chat.completions.create(model=MODEL, max_tokens=1,
                                      messages=[{"role": "user", "content": "Hi"}])
    assert exc.value.body["code"] == "api_key_revoked"
    other.goto("/dashboard/")
    assert "/dashboard/login" in other.url
    expect(other.locator(".notice")).to_contain_text("revoked")
    other.context.close()


def test_inference_key_cannot_reach_keys_page(inference_page: Page, server: RunningServer,
                                              tenant: dict) -> None:
    page = inference_page
    page.goto("/dashboard/")
    nav = page.locator("header nav")
    expect(nav.get_by_role("link", name="Playground")).to_be_visible()
    expect(nav.get_by_role("link", name="Usage")).to_be_visible()
    expect(nav.get_by_role("link", name="API keys")).to_have_count(0)
    expect(nav.get_by_role("link", name="Organisations")).to_have_count(0)
    shot(page, "overview-inference-key")
    response = page.goto("/dashboard/keys")
    assert response is not None and response.status == 403
    expect(page.locator("h1")).to_have_text("Not allowed")
    expect(page.locator("main")).to_contain_text("'admin' permission")
    shot(page, "forbidden")
    assert page.goto("/dashboard/orgs").status == 403  # type: ignore[union-attr]
    # nor can it create a key by posting the form itself, with a valid CSRF token
    page.goto("/dashboard/")
    r = page.request.post("/dashboard/keys", form={"csrf_token": csrf_of(page), "name": "sneaky",
                                                   "permissions": "admin"})
    assert r.status == 403
    listed = httpx.get(f"{server.api}/organizations/{tenant['org']}/api-keys",
                       headers=bearer(tenant["admin"])).json()["data"]
    assert "sneaky" not in [k["name"] for k in listed]


# --- playground ---------------------------------------------------------------------------------

PROMPT = "Write a short poem about the sea."


def test_playground_streams_reply(inference_page: Page, server: RunningServer,
                                  tenant: dict) -> None:
    page = inference_page
    page.goto("/dashboard/playground")
    page.select_option("#model", MODEL)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.fill("#messages .msg:first-child .content", PROMPT)
    # record what the reply box shows at every status update: it must grow while streaming
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const out = document.querySelector('#messages .msg:last-child .content');
            window.__seen.push([document.getElementById('status').dataset.state, out.value.length]);
        }).observe(document.getElementById('status'), {childList: true, characterData: true,
                                                       subtree: true, attributes: true});
    }""")
    page.click("#send-button")
    expect(page.locator("#status")).to_have_attribute("data-state", "done", timeout=60_000)
    reply = page.locator("#messages .msg").nth(1)
    expect(reply.locator(".role")).to_have_value("assistant")
    text = reply.locator(".content").input_value()
    seen = page.evaluate("window.__seen")
    partial = sorted({n for state, n in seen if state == "streaming" and 0 < n < len(text)})
    assert len(partial) >= 2, seen  # the page showed the reply growing, token by token

    # the same request through the API: the same text and the same usage
    api = openai.OpenAI(base_url=server.api, api_key=tenant["inference"], max_retries=0)
    same = api.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, top_p=1,
                                       frequency_penalty=0, presence_penalty=0,
                                       messages=[{"role": "user", "content": PROMPT}])
    assert text == same.choices[0].message.content
    assert page.locator("#stat-prompt").inner_text() == str(same.usage.prompt_tokens)
    assert page.locator("#stat-completion").inner_text() == str(same.usage.completion_tokens)
    assert re.fullmatch(r"\d+ ms", page.locator("#stat-latency").inner_text())
    assert re.fullmatch(r"\d+ ms", page.locator("#stat-ttft").inner_text())
    shot(page, "playground")

    page.click("#view-code summary")
    curl = page.locator("#code-curl-text").inner_text()
    prefix = tenant["inference"][:12]
    assert f"Bearer {prefix}••••••••" in curl and tenant["inference"] not in curl
    assert f"{server.api}/chat/completions" in curl and '"temperature": 0' in curl
    page.click("#tab-python")
    python = page.locator("#code-python-text").inner_text()
    assert f'api_key="{prefix}••••••••"' in python and "client.chat.completions.create(" in python
    assert f'"content": {PROMPT!r}'.replace("'", '"') in python
    page.click("#tab-javascript")
    js = page.locator("#code-javascript-text").inner_text()
    assert f'apiKey: "{prefix}••••••••"' in js and tenant["inference"] not in js
    assert tenant["inference"] not in page.content()
    shot(page, "playground-code")


def test_playground_stop_button(inference_page: Page) -> None:
    page = inference_page
    page.goto("/dashboard/playground")
    page.fill("#max_tokens", "1500")
    page.fill("#messages .msg:first-child .content", "Tell me a very long story about a dragon.")
    page.click("#send-button")
    expect(page.locator("#status")).to_have_attribute("data-chunks", re.compile(r"^([3-9]|\d\d+)$"),
                                                      timeout=60_000)
    page.click("#stop-button")
    expect(page.locator("#status")).to_have_attribute("data-state", "stopped")
    assert int(page.locator("#status").get_attribute("data-chunks") or 0) < 1500
    expect(page.locator("#send-button")).to_be_enabled()


def test_playground_endpoint_needs_session_and_csrf(inference_page: Page,
                                                    server: RunningServer) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    url = server.base_url + "/dashboard/api/chat/completions"
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "session_expired"
    cookies = session_cookie(inference_page)
    r = httpx.post(url, json=body, cookies=cookies)
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    inference_page.goto("/dashboard/")
    r = httpx.post(url, json=body, cookies=cookies,
                   headers={"X-CSRF-Token": csrf_of(inference_page)})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


# --- usage, models ------------------------------------------------------------------------------

def test_usage_page_shows_tokens_just_spent(inference_page: Page, server: RunningServer,
                                            tenant: dict) -> None:
    page = inference_page
    start = today_start()
    for _ in range(20):  # a stopped stream is billed when the server has unwound it
        total = api_usage(server, tenant["inference"], start)
        page.goto("/dashboard/usage")
        shown = int(page.locator("[data-total=total_tokens]").inner_text().replace(",", ""))
        if shown == total["total_tokens"]:
            break
        time.sleep(0.25)
    assert shown == total["total_tokens"] > 0
    assert int(page.locator("[data-total=requests]").inner_text()) == total["requests"] >= 3
    expect(page.locator("table.usage")).to_contain_text(MODEL)
    expect(page.locator("table.usage")).to_contain_text("playground only")
    assert page.locator("svg.chart rect.bar-b").count() >= 1  # completion tokens drawn
    shot(page, "usage")

    today = datetime.now(timezone.utc).date().isoformat()
    r = page.request.get(f"/dashboard/usage.csv?start={today}&end={today}")
    assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text())))
    assert sum(int(row["total_tokens"]) for row in rows) == total["total_tokens"]
    assert {row["key_id"] for row in rows} == {tenant["inference_id"]}  # its own usage only


def test_admin_usage_per_key_and_models(admin_page: Page, server: RunningServer) -> None:
    page = admin_page
    page.goto("/dashboard/usage")
    chart = page.locator("section[aria-labelledby=per-key] svg")
    expect(chart).to_contain_text("playground only")
    expect(chart).to_contain_text("Dashboard Co")
    page.goto("/dashboard/models")
    card = httpx.get(f"{server.api}/models/{MODEL}", headers=bearer(ADMIN_KEY)).json()
    row = page.locator("tr", has_text=MODEL)
    expect(row).to_contain_text(f"{card['context_length']:,}")
    expect(row).to_contain_text(card["owned_by"])
    expect(row).to_contain_text("gemma")  # its alias
    expect(row).to_contain_text("chat")
    embedder = page.locator("tr", has_text=EMBEDDINGS)
    expect(embedder).to_contain_text("embeddings")
    expect(embedder).to_contain_text("384 dimensions")
    expect(embedder.get_by_role("link", name="Try it")).to_have_count(0)
    shot(page, "models")
    page.goto("/dashboard/playground")  # only models that can chat are offered there
    assert page.locator("#model option").all_inner_texts() == ["smollm2-135m-instruct", MODEL]


# --- CSRF, sessions -----------------------------------------------------------------------------

def test_csrf_less_posts_are_refused(admin_page: Page, server: RunningServer,
                                     tenant: dict) -> None:
    cookies = session_cookie(admin_page)
    base = server.base_url
    form = {"name": "forged", "permissions": "admin"}
    for token in (None, "", "not-the-token"):
        data = form if token is None else {**form, "csrf_token": token}
        r = httpx.post(f"{base}/dashboard/keys", data=data, cookies=cookies)
        assert r.status_code == 403, r.text
        assert "security token" in r.text
    listed = httpx.get(f"{server.api}/organizations/{tenant['org']}/api-keys",
                       headers=bearer(tenant["admin"])).json()["data"]
    assert "forged" not in [k["name"] for k in listed]
    target = listed[0]["id"]
    r = httpx.post(f"{base}/dashboard/keys/{target}/revoke", cookies=cookies)
    assert r.status_code == 403
    r = httpx.post(f"{base}/dashboard/logout", cookies=cookies)
    assert r.status_code == 403
    r = httpx.post(f"{base}/dashboard/login", data={"api_key": ADMIN_KEY})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    # a token from another session does not work either
    other = httpx.get(f"{base}/dashboard/login")
    foreign = re.search(r'name="csrf_token" value="([^"]+)"', other.text).group(1)  # type: ignore[union-attr]
    r = httpx.post(f"{base}/dashboard/keys", data={**form, "csrf_token": foreign}, cookies=cookies)
    assert r.status_code == 403
    # the session itself is untouched: the real form still works
    admin_page.goto("/dashboard/keys")
    expect(admin_page.locator("tr", has_text=listed[0]["name"])).not_to_have_class("revoked")


def test_dashboard_routes_need_a_session(server: RunningServer) -> None:
    """Walk the dashboard's route table: without a session every page and every form post
    sends the browser to sign in, and does nothing."""
    from bastion.app import create_app

    seen = 0
    routes = [r for included in create_app().routes
              for r in getattr(included, "original_router", included).routes]
    for route in routes:
        path = getattr(route, "path", "")
        if not path.startswith("/dashboard") or path.startswith("/dashboard/static"):
            continue
        url = server.base_url + re.sub(r"\{[^}]+\}", "x", path)
        for method in route.methods:  # type: ignore[attr-defined]
            r = httpx.request(method, url)
            seen += 1
            if path == "/dashboard/login" and method == "GET":
                assert r.status_code == 200
            elif path == "/dashboard":
                assert r.status_code == 308
            elif path.startswith("/dashboard/api/"):
                assert r.status_code == 401, (method, path)
            elif path in ("/dashboard/login", "/dashboard/logout"):
                assert r.status_code == 403, (method, path, r.status_code)  # no CSRF token
            else:
                assert r.status_code == 303, (method, path, r.status_code)
                assert r.headers["location"].startswith("/dashboard/login")
    assert seen >= 12


def test_sign_out(browser: object, server: RunningServer, tenant: dict) -> None:
    page = sign_in(browser, server, tenant["inference"])
    copied = session_cookie(page)
    page.goto("/dashboard/")
    csrf = csrf_of(page)
    assert httpx.get(server.base_url + "/dashboard/", cookies=copied).status_code == 200
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/dashboard/login")
    page.goto("/dashboard/usage")
    assert "/dashboard/login" in page.url
    # a copy of the cookie taken before signing out is dead too
    r = httpx.get(server.base_url + "/dashboard/", cookies=copied)
    assert r.status_code == 303 and "reason=signed_out" in r.headers["location"]
    r = httpx.post(server.base_url + "/dashboard/api/chat/completions", cookies=copied,
                   headers={"X-CSRF-Token": csrf},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 401
    page.context.close()


# --- the server administrator -----------------------------------------------------------------

def test_server_admin_manages_organisations(browser: object, server: RunningServer,
                                            admin_page: Page) -> None:
    assert admin_page.goto("/dashboard/orgs").status == 403  # type: ignore[union-attr]
    page = sign_in(browser, server, ADMIN_KEY)
    page.get_by_role("link", name="Organisations").click()
    page.fill("#org-name", "Browser Org")
    page.select_option("#org-plan", "spark")
    page.click("form[action='/dashboard/orgs'] button[type=submit]")
    expect(page.locator(".notice")).to_contain_text("Browser Org")
    row = page.locator("tr", has_text="Browser Org")
    org_id = row.get_attribute("data-org-id")
    expect(row).to_contain_text("10,000")  # spark's tokens per hour
    row.locator("select").select_option("scale")
    row.get_by_role("button", name="Set plan").click()
    expect(page.locator(".notice")).to_contain_text("scale plan")
    got = httpx.get(f"{server.api}/organizations/{org_id}", headers=bearer(ADMIN_KEY)).json()
    assert got["plan"] == "scale" and got["limits"]["tokens_per_hour"] is None
    shot(page, "orgs")
    page.context.close()


def test_pages_fit_a_phone(browser: object, server: RunningServer, tenant: dict) -> None:
    page = sign_in(browser, server, tenant["admin"], viewport=(390, 844))
    for name in ("", "playground", "usage", "keys", "models"):
        page.goto(f"/dashboard/{name}")
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], (name, width)  # no sideways scrolling of the page
        shot(page, f"phone-{name or 'overview'}")
    page.context.close()
