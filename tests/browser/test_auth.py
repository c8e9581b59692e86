"""The dashboard with tokens required, in chromium: signing in turns a token into an HttpOnly,
SameSite session cookie; a read-only token sees no launch buttons and cannot open the form; a
form post without the CSRF token is refused (and with it, accepted), the sign-in form's
included (login CSRF)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from service.api.auth import create_token
from service.db import Database
from service.schemas import Scope
from tests.browser.conftest import MISSING, context_options, needs_browser
from tests.integration.conftest import Server, running_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytestmark = needs_browser
expect = pytest.importorskip("playwright.sync_api", reason=str(MISSING)).expect


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server("sqlite", tmp_path_factory.mktemp("auth"), TRTFORGE_AUTH="true") as srv:
        yield srv


@pytest.fixture(scope="module")
def tokens(secured: Server) -> dict[str, str]:
    assert secured.database_url is not None
    db = Database(secured.database_url)
    try:
        with db.session() as session:
            return {
                scope.value: create_token(session, f"browser-{scope.value}", scope)[1]
                for scope in (Scope.READ, Scope.BUILD)
            }
    finally:
        db.dispose()


@pytest.fixture
def context(browser: Browser, secured: Server) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=secured.url, **context_options())
    yield context
    context.close()


def _sign_in(page: Page, token: str) -> None:
    page.goto("/")
    expect(page.locator("h1")).to_have_text("Sign in")  # the list needs a token
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))
    expect(page.locator("h1")).to_have_text("Builds")


def test_login_sets_an_httponly_samesite_session(context: BrowserContext, tokens: dict[str, str]) -> None:
    page = context.new_page()
    page.goto("/login")
    page.fill("#token", "tfk_not_a_token")
    page.click("button[type=submit]")
    expect(page.locator("[role=alert]")).to_contain_text("unknown or revoked")
    _sign_in(page, tokens["build"])
    cookie = next(c for c in context.cookies() if c["name"] == "trtforge_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert tokens["build"] not in cookie["value"]  # a signed session, never the token
    assert page.evaluate("document.cookie") == ""  # no script can read either cookie
    expect(page.get_by_role("link", name="New build")).to_have_count(2)  # nav and the button
    expect(page.locator(".who")).to_contain_text("browser-build")
    page.click(".who button")  # sign out
    page.wait_for_url(re.compile(r"/login$"))
    page.goto("/")
    expect(page.locator("h1")).to_have_text("Sign in")


def test_read_only_token_sees_no_launch_buttons(context: BrowserContext, tokens: dict[str, str]) -> None:
    page = context.new_page()
    _sign_in(page, tokens["read"])
    expect(page.get_by_role("link", name="New build")).to_have_count(0)
    expect(page.locator("text=New build")).to_have_count(0)
    page.goto("/builds/new")
    expect(page.locator("form#build-form")).to_have_count(0)
    expect(page.locator("[role=alert]")).to_contain_text("needs 'build'")
    page.goto("/models")
    expect(page.locator("h1")).to_have_text("Models")


def test_form_post_without_csrf_token_is_refused(context: BrowserContext, tokens: dict[str, str]) -> None:
    page = context.new_page()
    _sign_in(page, tokens["build"])
    page.goto("/builds/new")
    form = {"model_id": "0" * 64, "dataset_id": "0" * 64, "precision": "int8"}
    refused = page.request.post("/ui/builds", form=form, max_redirects=0)
    assert refused.status == 403
    assert "CSRF" in refused.text()
    forged = page.request.post("/ui/builds", form={**form, "csrf_token": "x" * 43}, max_redirects=0)
    assert forged.status == 403
    csrf = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    accepted = page.request.post("/ui/builds", form={**form, "csrf_token": csrf}, max_redirects=0)
    assert accepted.status == 404  # past the CSRF check: the unknown model is what is refused
    assert "No model with id" in accepted.text()


def test_sign_in_post_without_csrf_token_is_refused(
    context: BrowserContext, tokens: dict[str, str]
) -> None:
    page = context.new_page()
    page.goto("/login")
    hidden = page.locator("#login-form input[name=csrf_token]")
    expect(hidden).to_have_count(1)
    refused = page.request.post("/login", form={"token": tokens["build"]}, max_redirects=0)
    assert refused.status == 403 and "CSRF" in refused.text()
    forged = page.request.post(
        "/login", form={"token": tokens["build"], "csrf_token": "x" * 43}, max_redirects=0
    )
    assert forged.status == 403
    assert not any(c["name"] == "trtforge_session" for c in context.cookies())
    csrf = hidden.get_attribute("value") or ""
    accepted = page.request.post(
        "/login", form={"token": tokens["build"], "csrf_token": csrf}, max_redirects=0
    )
    assert accepted.status == 303
    assert any(c["name"] == "trtforge_session" for c in context.cookies())
