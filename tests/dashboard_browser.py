"""A real headless Chromium for the dashboard tests (test_dashboard*.py): the browser fixture,
signing in with an API key, the session's cookies and CSRF token, and screenshots kept in
test-artifacts/ for a person to look at. Imported by those modules, so one place launches it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from conftest import RunningServer

CHROMIUM = Path(os.environ.get("BASTION_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed: pip install -e '.[test]'")
Page = sync_api.Page


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def sign_in(browser: object, server: RunningServer, key: str, *,
            viewport: tuple[int, int] = (1280, 860)) -> Page:
    context = browser.new_context(base_url=server.base_url,  # type: ignore[attr-defined]
                                  viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    page.goto("/dashboard/login")
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/")
    return page


def session_cookie(page: Page) -> dict[str, str]:
    return {c["name"]: c["value"] for c in page.context.cookies()}


def csrf_of(page: Page) -> str:
    return page.locator("form[action='/dashboard/logout'] input[name=csrf_token]").input_value()
