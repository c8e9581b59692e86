from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from service.api.auth import create_token
from service.db import Database
from service.schemas import Scope
from tests.unit.service.support import login_form, model_bytes


@pytest.fixture
def secured(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(auth=True)


def _token(db_url: str, scope: Scope) -> str:
    db = Database(db_url)
    with db.session() as session:
        _, token = create_token(session, f"{scope.value}-token", scope)
    db.dispose()
    return token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_requests_without_a_token_are_401(secured: TestClient) -> None:
    response = secured.get("/v1/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthenticated"
    assert "tokens create" in response.json()["error"]["hint"]
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/metrics").status_code == 401


def test_scopes_decide_what_a_token_may_do(secured: TestClient, db_url: str) -> None:
    read, build = _token(db_url, Scope.READ), _token(db_url, Scope.BUILD)
    assert secured.get("/v1/models", headers=_bearer(read)).status_code == 200
    upload = {"file": ("t.onnx", model_bytes())}
    refused = secured.post("/v1/models", files=upload, headers=_bearer(read))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    assert secured.post("/v1/models", files=upload, headers=_bearer(build)).status_code == 201
    assert secured.get("/v1/tokens", headers=_bearer(build)).status_code == 403


def test_admins_manage_tokens_over_the_api(secured: TestClient, db_url: str) -> None:
    admin = _bearer(_token(db_url, Scope.ADMIN))
    created = secured.post("/v1/tokens", json={"name": "ci", "scope": "build"}, headers=admin)
    assert created.status_code == 201
    body = created.json()
    assert body["scope"] == "build" and body["token"].startswith("tfk_")
    listed = secured.get("/v1/tokens", headers=admin).json()
    assert "token" not in listed[0]
    assert {t["name"] for t in listed} == {"admin-token", "ci"}
    assert secured.get("/v1/models", headers=_bearer(body["token"])).status_code == 200
    assert secured.delete(f"/v1/tokens/{body['id']}", headers=admin).status_code == 204
    assert secured.get("/v1/models", headers=_bearer(body["token"])).status_code == 401


def test_dashboard_asks_for_a_token_and_keeps_it_in_a_cookie(
    secured: TestClient, db_url: str
) -> None:
    page = secured.get("/")
    assert page.status_code == 401
    assert "<form" in page.text
    bad = secured.post("/login", data=login_form(secured, "wrong"), follow_redirects=False)
    assert bad.status_code == 401
    token = _token(db_url, Scope.READ)
    login = secured.post("/login", data=login_form(secured, token), follow_redirects=False)
    assert login.status_code == 303
    assert "httponly" in login.headers["set-cookie"].lower()
    assert secured.get("/").status_code == 200
    assert secured.get("/v1/models").status_code == 200  # GET honours the cookie
    assert secured.post("/v1/models", files={"file": ("t.onnx", b"x")}).status_code == 401


def test_auth_is_off_on_loopback_by_default(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/tokens").status_code == 200
