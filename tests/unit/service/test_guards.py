"""The HTTP edge in process: Host names, body caps, dashboard sessions, path scrubbing, the
settings and options behind them. (Real servers and raw sockets: tests/reliability.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.errors import ModelError
from service.api.auth import SESSION_COOKIE, authenticate_session, create_session, create_token
from service.api.auth import session_secret as secret_of
from service.api.guards import UPLOAD_ROUTES, EdgePolicy, host_name
from service.api.server import HeaderDeadlineProtocol, uvicorn_options
from service.db import Database
from service.errors import AuthenticationError, SettingsError, scrub_paths
from service.schemas import BuildCreate, Scope
from service.settings import Settings, load_settings
from tests.unit.service.support import login_form

MiB = 1 << 20


def _token(db_url: str, scope: Scope = Scope.READ) -> tuple[str, str]:
    db = Database(db_url)
    with db.session() as session:
        row, token = create_token(session, f"{scope.value}-token", scope)
        token_id = row.id
    db.dispose()
    return token_id, token


def _revoke(db_url: str, token_id: str) -> None:
    from service.api.auth import revoke_token

    db = Database(db_url)
    with db.session() as session:
        revoke_token(session, token_id)
    db.dispose()


@pytest.fixture
def secured(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(auth=True)


# -- Host ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("Example.COM:8000", "example.com"),
        ("[::1]:80", "::1"),
        ("localhost.", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
    ],
)
def test_host_names(value: str, name: str) -> None:
    assert host_name(value) == name


def test_loopback_binds_answer_loopback_names_only(tmp_path: Path) -> None:
    policy = EdgePolicy.from_settings(Settings(data_dir=tmp_path))
    assert policy.hosts == frozenset({"localhost", "127.0.0.1", "::1"})
    wildcard = EdgePolicy.from_settings(Settings(data_dir=tmp_path, host="0.0.0.0"))
    assert wildcard.hosts is None  # tokens are required there; any name is answered
    named = EdgePolicy.from_settings(
        Settings(data_dir=tmp_path, host="0.0.0.0", allowed_hosts="api.example, Other.example")
    )
    assert named.hosts == frozenset({"api.example", "other.example"})


def test_a_foreign_host_is_421(make_client: Callable[..., TestClient]) -> None:
    client = make_client(allowed_hosts=None)  # the default: TestClient's "testserver" is foreign
    response = client.get("/v1/models")
    assert response.status_code == 421
    assert response.json()["error"]["code"] == "host_not_allowed"
    assert client.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200


# -- bodies -------------------------------------------------------------------------------------


def test_upload_routes_are_the_multipart_routes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    multipart = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "multipart/form-data" in operation.get("requestBody", {}).get("content", {})
    }
    assert multipart == set(UPLOAD_ROUTES)


def _stream(total: int) -> Iterator[bytes]:
    for _ in range(total // MiB):
        yield b" " * MiB


def test_json_bodies_over_the_cap_are_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_json_body_bytes=MiB)
    declared = client.post("/v1/builds", content=b" " * (2 * MiB))
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "payload_too_large"
    assert "TRTFORGE_MAX_JSON_BODY_BYTES" in declared.json()["error"]["hint"]
    streamed = client.post(
        "/v1/tokens", content=_stream(2 * MiB), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert client.post("/v1/tokens", json={"name": "fits"}).status_code == 201


def test_a_body_without_a_token_is_401_before_it_is_read(secured: TestClient) -> None:
    response = secured.post(
        "/v1/builds", content=_stream(8 * MiB), headers={"content-type": "application/json"}
    )
    assert response.status_code == 401
    assert response.headers["connection"] == "close"
    bad = secured.post("/v1/builds", json={}, headers={"authorization": "Bearer tfk_nope"})
    assert bad.status_code == 401


def test_out_of_range_integers_are_refused_by_the_schema() -> None:
    base = {"model_id": "m", "dataset_id": "d"}
    for bad in (
        {"accuracy": {"seed": -1}},
        {"accuracy": {"seed": 1 << 32}},
        {"benchmark": {"iterations": 10**12}},
        {"benchmark": {"warmup_ms": 1e30}},
        {"calibration": {"batch_size": 10**6}},
        {"accuracy": {"max_samples": 10**19}},
        {"table_id": ""},
    ):
        with pytest.raises(ValidationError):
            BuildCreate.model_validate({**base, **bad})
    assert BuildCreate.model_validate({**base, "accuracy": {"seed": (1 << 32) - 1}})


# -- dashboard sessions -------------------------------------------------------------------------


def test_the_session_cookie_holds_no_token(secured: TestClient, db_url: str) -> None:
    _token_id, token = _token(db_url)
    login = secured.post("/login", data=login_form(secured, token), follow_redirects=False)
    assert login.status_code == 303
    cookie = login.headers["set-cookie"]
    assert token not in cookie
    assert token.split("_")[-1] not in cookie
    lowered = cookie.lower()
    assert "httponly" in lowered
    assert "samesite=strict" in lowered
    assert "secure" not in lowered  # plain http
    assert "max-age=43200" in lowered
    assert secured.get("/v1/models").status_code == 200
    assert secured.get("/").status_code == 200
    # the cookie never authenticates a state change
    assert secured.post("/v1/tokens", json={"name": "x"}).status_code == 401
    logout = secured.post("/logout", follow_redirects=False)
    assert logout.status_code == 303
    assert SESSION_COOKIE not in secured.cookies
    assert secured.get("/v1/models").status_code == 401


def test_sessions_end_with_their_token_and_cannot_be_forged(
    secured: TestClient, db_url: str, data_dir: Path
) -> None:
    token_id, token = _token(db_url)
    secured.post("/login", data=login_form(secured, token), follow_redirects=False)
    value = secured.cookies[SESSION_COOKIE]
    forged_id, expires, mac = value.split(".")
    for forged in (
        f"{forged_id}.{int(expires) + 10**6}.{mac}",
        f"{forged_id}.{expires}.{mac[:-2]}AA",
        f"{forged_id}.{expires}",
        "x" * 5000,
    ):
        secured.cookies.clear()
        secured.cookies.set(SESSION_COOKIE, forged)
        assert secured.get("/v1/models").status_code == 401, forged
    secured.cookies.clear()
    secured.cookies.set(SESSION_COOKIE, value)
    assert secured.get("/v1/models").status_code == 200
    _revoke(db_url, token_id)
    assert secured.get("/v1/models").status_code == 401
    assert (data_dir / "session.key").stat().st_mode & 0o777 == 0o600


def test_expired_sessions_are_refused(db_url: str, data_dir: Path) -> None:
    token_id, token = _token(db_url)
    secret = secret_of(data_dir)
    db = Database(db_url)
    try:
        with db.session() as session:
            live = create_session(token, token_id, secret, 60)
            assert authenticate_session(session, live, secret, Scope.READ).token_id == token_id
            expired = create_session(token, token_id, secret, -1)
            with pytest.raises(AuthenticationError):
                authenticate_session(session, expired, secret, Scope.READ)
            with pytest.raises(AuthenticationError):  # another server secret
                authenticate_session(session, live, b"k" * 32, Scope.READ)
    finally:
        db.dispose()


def test_the_cookie_is_secure_behind_tls(
    make_client: Callable[..., TestClient], db_url: str
) -> None:
    _token_id, token = _token(db_url)
    forced = make_client(auth=True, cookie_secure=True)
    login = forced.post("/login", data=login_form(forced, token), follow_redirects=False)
    assert "secure" in login.headers["set-cookie"].lower()
    https = make_client(auth=True)
    https.base_url = https.base_url.copy_with(scheme="https")
    login = https.post("/login", data=login_form(https, token), follow_redirects=False)
    assert "secure" in login.headers["set-cookie"].lower()


def test_a_stale_cookie_is_ignored_when_authentication_is_off(client: TestClient) -> None:
    client.cookies.set(SESSION_COOKIE, "abc.1.xyz")
    assert client.get("/v1/models").status_code == 200


# -- paths in messages --------------------------------------------------------------------------


def test_server_paths_are_cut_to_their_last_component(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert scrub_paths(f"Artifact '{data}/work/b1/model.onnx' does not exist", data) == (
        "Artifact 'model.onnx' does not exist"
    )
    assert "/" not in scrub_paths(f"{data}/tmp/p7/stage-1/entry/w.bin is not regular file", data)
    assert scrub_paths("node /model/conv1/Conv failed", data) == "node /model/conv1/Conv failed"
    assert scrub_paths("see http://host/tmp/a", data) == "see http://host/tmp/a"


def test_error_responses_carry_no_server_paths(client: TestClient, data_dir: Path) -> None:
    def boom() -> None:
        raise ModelError(
            f"Data of w should be in {data_dir}/tmp/p7446-x/stage-y/entry/w.bin, "
            "but it is not regular file",
            hint=f"Look in {data_dir.resolve()}/models.",
        )

    client.app.add_api_route("/boom", boom)  # type: ignore[attr-defined]
    error = client.get("/boom").json()["error"]
    assert str(data_dir) not in error["message"] + error["hint"]
    assert "w.bin" in error["message"]


# -- settings and server options ----------------------------------------------------------------


@pytest.mark.parametrize("origin", ["app.example", "https://app.example/", "https://a/b"])
def test_cors_origins_must_be_origins(tmp_path: Path, origin: str) -> None:
    with pytest.raises(SettingsError, match="cors_origins"):
        load_settings(data_dir=tmp_path, cors_origins=[origin])


def test_names_come_comma_separated_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRTFORGE_CORS_ORIGINS", "https://a.example, http://b.example:8080")
    monkeypatch.setenv("TRTFORGE_ALLOWED_HOSTS", '["api.example"]')
    settings = Settings(data_dir=tmp_path)
    assert settings.cors_origins == ["https://a.example", "http://b.example:8080"]
    assert settings.allowed_hosts == ["api.example"]


def test_uvicorn_runs_the_header_deadline_protocol(tmp_path: Path) -> None:
    options = uvicorn_options(Settings(data_dir=tmp_path, header_timeout_s=3.5))
    protocol = options["http"]
    assert issubclass(protocol, HeaderDeadlineProtocol)
    assert issubclass(protocol, HttpToolsProtocol)  # the C parser (bench/README.md)
    assert protocol.header_timeout_s == 3.5
    assert protocol.max_header_bytes == 16 * 1024
    assert options["forwarded_allow_ips"] == ["127.0.0.1"]
