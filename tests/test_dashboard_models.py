"""The dashboard's Models page: upload and delete an organisation's own model in a real headless
Chromium, through the same uploads.lifecycle as POST/DELETE /v1/models. Screenshots go to
test-artifacts/."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from conftest import ADMIN_KEY, RunningServer, bearer, make_tenant
from dashboard_browser import (CHROMIUM, Page, browser, csrf_of, session_cookie, shot, sign_in,
                               sync_api)
from tiny_llama import build_tiny_llama

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}")
expect = sync_api.expect
__all__ = ["browser"]  # the browser fixture, shared by the dashboard tests


@pytest.fixture(scope="module")
def org(server: RunningServer) -> dict:
    org_id, key = make_tenant(server.api, "seed", permissions=("models", "inference"),
                              name="Model Makers")
    r = httpx.post(f"{server.api}/organizations/{org_id}/api-keys", headers=bearer(ADMIN_KEY),
                   json={"name": "chat only", "permissions": ["inference"]})
    assert r.status_code == 200, r.text
    sdk = openai.OpenAI(base_url=server.api, api_key=key["key"], max_retries=0, timeout=120)
    return {"org": org_id, "models": key["key"], "inference": r.json()["key"], "sdk": sdk}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("dash-tiny"))


@pytest.fixture(scope="module")
def page(browser: object, server: RunningServer, org: dict) -> Iterator[Page]:
    p = sign_in(browser, server, org["models"])
    yield p
    p.context.close()


def fill_upload(page: Page, tiny: Path, model_id: str, config: Path | None = None) -> None:
    page.get_by_label("Model id").fill(model_id)
    page.locator("#model-file").set_input_files(str(tiny / "model.safetensors"))
    page.locator("#model-config").set_input_files(str(config or tiny / "config.json"))
    page.locator("#model-tokenizer").set_input_files(str(tiny / "tokenizer.json"))
    page.locator("#model-tokenizer-config").set_input_files(str(tiny / "tokenizer_config.json"))
    page.locator("#model-chat-template").set_input_files(str(tiny / "chat_template.jinja"))
    page.get_by_role("button", name="Upload").click()


def test_upload_then_chat_then_delete(page: Page, org: dict, tiny: Path) -> None:
    page.get_by_role("link", name="Models").first.click()
    expect(page.locator("h1")).to_have_text("Models")
    expect(page.locator("tr[data-model-id='gemma-3-270m'] button")).to_have_count(0)  # not ours
    fill_upload(page, tiny, "dash-model")
    page.wait_for_url(re.compile(r"/dashboard/models\?uploaded=dash-model"))
    expect(page.locator(".notice")).to_have_text("Uploaded dash-model.")
    row = page.locator("tr[data-model-id='dash-model']")
    expect(row.locator("td").nth(2)).to_have_text(org["org"])
    expect(row.locator("td").nth(4)).to_have_text("256")
    expect(row).to_contain_text("chat")
    shot(page, "models-uploaded")
    # the API serves it to this organisation
    reply = org["sdk"].chat.completions.create(model="dash-model", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "hello"}])
    assert reply.usage.completion_tokens > 0

    asked: list[str] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss() if len(asked) == 1 else dialog.accept()

    page.on("dialog", answer)
    try:
        row.get_by_role("button", name="Delete dash-model").click()
        expect(row).to_be_visible()  # dismissed: nothing happened
        assert org["sdk"].models.retrieve("dash-model").id == "dash-model"
        row.get_by_role("button", name="Delete dash-model").click()
        page.wait_for_url(re.compile(r"deleted=dash-model"))
    finally:
        page.remove_listener("dialog", answer)
    assert asked[0].startswith("Delete the model dash-model?") and len(asked) == 2
    expect(page.locator(".notice")).to_have_text("Deleted dash-model.")
    expect(page.locator("tr[data-model-id='dash-model']")).to_have_count(0)
    with pytest.raises(openai.NotFoundError):
        org["sdk"].models.retrieve("dash-model")


def test_bad_upload_shows_the_apis_error(page: Page, org: dict, tiny: Path,
                                         tmp_path: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    wrong = tmp_path / "config.json"
    wrong.write_text(json.dumps({**config, "intermediate_size": 80}))
    page.goto("/dashboard/models")
    fill_upload(page, tiny, "wrong-shape", config=wrong)
    error = page.locator("#upload-error")
    expect(error).to_contain_text("config.json implies")
    expect(error).to_contain_text(re.compile(r"has shape \[\d+, 64\] but config.json implies \[\d+, 80\]|has shape \[64, \d+\] but config.json implies \[80, \d+\]"))
    expect(page.get_by_label("Model id")).to_have_value("wrong-shape")  # kept for a retry
    shot(page, "models-upload-error")
    assert "wrong-shape" not in [m.id for m in org["sdk"].models.list()]


def test_inference_key_cannot_upload_or_delete(browser: object, server: RunningServer,
                                               org: dict, tiny: Path) -> None:
    page = sign_in(browser, server, org["inference"])
    try:
        page.goto("/dashboard/models")
        expect(page.locator("h1")).to_have_text("Models")
        expect(page.locator("#upload-heading")).to_have_count(0)
        expect(page.locator("form[action='/dashboard/models/delete']")).to_have_count(0)
        cookies, token = session_cookie(page), csrf_of(page)
    finally:
        page.context.close()
    base = server.base_url
    r = httpx.post(f"{base}/dashboard/models", cookies=cookies,
                   data={"csrf_token": token, "model_id": "sneaky"},
                   files={"file": ("model.safetensors",
                                   (tiny / "model.safetensors").read_bytes())})
    assert r.status_code == 403
    r = httpx.post(f"{base}/dashboard/models/delete", cookies=cookies,
                   data={"csrf_token": token, "model": "gemma-3-270m"})
    assert r.status_code == 403


def test_csrf_less_upload_and_delete_are_refused(page: Page, server: RunningServer,
                                                 org: dict, tiny: Path) -> None:
    page.goto("/dashboard/models")
    cookies = session_cookie(page)
    partial = server.data_dir / "uploaded_models" / ".partial"
    before = set(partial.glob("*")) if partial.exists() else set()
    r = httpx.post(f"{server.base_url}/dashboard/models", cookies=cookies,
                   data={"model_id": "forged", "csrf_token": "wrong"},
                   files={"file": ("model.safetensors",
                                   (tiny / "model.safetensors").read_bytes())})
    assert r.status_code == 403 and "security token" in r.text
    assert (set(partial.glob("*")) if partial.exists() else set()) == before
    r = httpx.post(f"{server.base_url}/dashboard/models/delete", cookies=cookies,
                   data={"model": "anything"})
    assert r.status_code == 403
    assert "forged" not in [m.id for m in org["sdk"].models.list()]
