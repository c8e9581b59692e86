"""Cheap polling (issue 11, defect 3): ETag/If-None-Match on a build's status and report, a
503 instead of a hang when the database pool is exhausted, the pool and threads from settings."""

from __future__ import annotations

import json
import threading

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update

from service.api.caching import none_match, weak_etag
from service.api.deps import AppState
from service.db.models import BuildRow
from service.errors import SettingsError
from service.settings import load_settings
from tests.unit.service.support import dataset_bytes, model_bytes


def _state(client: TestClient) -> AppState:
    state: AppState = client.app.state.trtforge  # type: ignore[attr-defined]
    return state


@pytest.fixture
def build_id(client: TestClient) -> str:
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}).json()
    dataset = client.post(
        "/v1/datasets", files={"file": ("d.npz", dataset_bytes())}, data={"model_id": model["id"]}
    ).json()
    response = client.post("/v1/builds", json={"model_id": model["id"], "dataset_id": dataset["id"]})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _assert_not_modified(response: object, etag: str) -> None:
    assert response.status_code == 304  # type: ignore[attr-defined]
    assert response.content == b""  # type: ignore[attr-defined]
    assert response.headers["etag"] == etag  # type: ignore[attr-defined]


def test_none_match_compares_weakly_and_star_matches_anything() -> None:
    tag = weak_etag("b", 1)
    assert tag.startswith('W/"') and tag == weak_etag("b", 1) != weak_etag("b", 2)
    assert none_match(tag, tag)
    assert none_match(tag.removeprefix("W/"), tag)  # weak comparison ignores W/
    assert none_match(f'"other", {tag}', tag)
    assert none_match(" * ", tag)
    assert not none_match('"other"', tag)
    assert not none_match(None, tag)
    assert not none_match("", tag)


def test_status_etag_gives_304_until_the_build_changes(client: TestClient, build_id: str) -> None:
    first = client.get(f"/v1/builds/{build_id}")
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert etag.startswith('W/"') and first.headers["cache-control"] == "no-cache"
    assert first.json()["id"] == build_id

    same = client.get(f"/v1/builds/{build_id}", headers={"If-None-Match": etag})
    _assert_not_modified(same, etag)
    star = client.get(f"/v1/builds/{build_id}", headers={"If-None-Match": "*"})
    _assert_not_modified(star, etag)
    other = client.get(f"/v1/builds/{build_id}", headers={"If-None-Match": '"nope"'})
    assert (other.status_code, other.headers["etag"]) == (200, etag)

    with _state(client).db.session() as session:  # progress moves: a new tag, a full answer
        session.execute(update(BuildRow).where(BuildRow.id == build_id).values(progress=0.5))
        session.commit()
    moved = client.get(f"/v1/builds/{build_id}", headers={"If-None-Match": etag})
    assert moved.status_code == 200 and moved.json()["progress"] == 0.5
    assert moved.headers["etag"] != etag

    assert client.post(f"/v1/builds/{build_id}/cancel").status_code == 202
    cancelled = client.get(f"/v1/builds/{build_id}", headers={"If-None-Match": moved.headers["etag"]})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_unknown_build_is_404_even_with_if_none_match_star(client: TestClient) -> None:
    for path in ("/v1/builds/nope", "/v1/builds/nope/report"):
        response = client.get(path, headers={"If-None-Match": "*"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_report_etag_is_its_sha256(client: TestClient, build_id: str) -> None:
    state = _state(client)
    no_report = client.get(f"/v1/builds/{build_id}/report", headers={"If-None-Match": "*"})
    assert no_report.status_code == 409  # no representation yet: * does not match
    assert no_report.json()["error"]["code"] == "not_ready"

    data = json.dumps({"build_id": build_id, "anything": [1, 2, 3]}).encode()
    blob = state.storage.put_bytes(data)
    with state.db.session() as session:
        session.execute(
            update(BuildRow).where(BuildRow.id == build_id).values(report_sha256=blob.sha256)
        )
        session.commit()

    first = client.get(f"/v1/builds/{build_id}/report")
    assert (first.status_code, first.content) == (200, data)
    assert first.headers["etag"] == f'"{blob.sha256}"'
    for tag in (f'"{blob.sha256}"', f'W/"{blob.sha256}"', "*", f'"x", "{blob.sha256}"'):
        again = client.get(f"/v1/builds/{build_id}/report", headers={"If-None-Match": tag})
        _assert_not_modified(again, f'"{blob.sha256}"')
    stale = client.get(f"/v1/builds/{build_id}/report", headers={"If-None-Match": '"0000"'})
    assert (stale.status_code, stale.content) == (200, data)
    # the HTML page's tag: tests/reliability/test_load.py (it needs a real report)


def test_an_exhausted_pool_answers_503_then_recovers(make_client: object, build_id: str) -> None:
    client = make_client(db_pool_size=1, db_max_overflow=0, db_pool_timeout_s=0.3)  # type: ignore[operator]
    state = _state(client)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with state.db.session() as session:
            session.execute(text("SELECT 1"))  # checks out the only connection
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        for path in (f"/v1/builds/{build_id}", f"/v1/builds/{build_id}/report", "/v1/builds"):
            busy = client.get(path)
            assert busy.status_code == 503, (path, busy.text)
            assert busy.headers["retry-after"] == "1"
            error = busy.json()["error"]
            assert error["code"] == "unavailable"
            assert "no database connection" in error["message"]
            assert "TRTFORGE_DB_POOL_SIZE" in error["hint"]
    finally:
        release.set()
        holder.join(10)
    assert client.get(f"/v1/builds/{build_id}").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_pool_and_threads_come_from_settings(make_client: object) -> None:
    client = make_client(db_pool_size=3, db_max_overflow=4, api_threads=7)  # type: ignore[operator]
    state = _state(client)
    if state.db.is_sqlite and state.db.sqlite_path is None:
        pytest.skip("in-memory SQLite has a single-connection pool")
    pool = state.db.engine.pool
    assert (pool.size(), pool._max_overflow) == (3, 4)  # type: ignore[attr-defined]
    tokens = client.portal.call(lambda: anyio.to_thread.current_default_thread_limiter().total_tokens)  # type: ignore[union-attr]
    assert tokens == 7


@pytest.mark.parametrize(
    ("name", "value"),
    [("db_pool_size", 0), ("db_max_overflow", -1), ("db_pool_timeout_s", 0), ("api_threads", 0)],
)
def test_pool_settings_refuse_nonsense(name: str, value: int) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(**{name: value})
    assert info.value.field == name
