"""Deleting a model while a build that uses it is submitted: whichever commits second answers 409
with the envelope, never 500, and the database stays consistent. The interleavings are forced
by running the other side at a fixed point of the real code (SQLite, and PostgreSQL when
configured)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import Database
from service.db.models import BuildRow, JobRow, ModelRow
from service.schemas import BuildCreate
from service.settings import Settings
from service.store import builds, catalog
from service.store.storage import Storage
from tests.unit.service.support import dataset_bytes, model_bytes


@pytest.fixture
def ids(client: TestClient) -> dict[str, str]:
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}).json()
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", dataset_bytes())}).json()
    return {"model_id": model["id"], "dataset_id": dataset["id"]}


def _elsewhere(settings: Settings, action: Callable[[Session, Storage], Any]) -> None:
    """Run ``action`` as another request would: its own connection, committed."""
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as session:
            action(session, Storage(settings.data_dir))
    finally:
        db.dispose()


def _submitter(client: TestClient, ids: dict[str, str]) -> Callable[[Session, Storage], Any]:
    queue = client.app.state.trtforge.queue  # type: ignore[attr-defined]

    def submit(session: Session, storage: Storage) -> None:
        builds.submit_build(session, storage, queue, BuildCreate.model_validate(ids))

    return submit


def _counts(settings: Settings) -> tuple[int, int, int]:
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as session:
            return (
                session.scalar(select(func.count()).select_from(ModelRow)) or 0,
                session.scalar(select(func.count()).select_from(BuildRow)) or 0,
                session.scalar(select(func.count()).select_from(JobRow)) or 0,
            )
    finally:
        db.dispose()


def test_a_build_submitted_while_its_model_is_deleted_is_409(
    client: TestClient, settings: Settings, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = builds._check_target

    def delete_the_model_meanwhile(*args: Any) -> None:
        checked(*args)
        _elsewhere(settings, lambda s, st: catalog.delete_model(s, st, ids["model_id"]))

    monkeypatch.setattr(builds, "_check_target", delete_the_model_meanwhile)
    response = client.post("/v1/builds", json=ids)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "conflict"
    assert "deleted while it was submitted" in error["message"]
    assert error["hint"]
    assert _counts(settings) == (0, 0, 0)
    assert client.get(f"/v1/models/{ids['model_id']}").status_code == 404
    assert client.get("/healthz").status_code == 200


def test_a_model_whose_files_vanish_during_the_checks_is_409(
    client: TestClient, settings: Settings, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    get_dataset = builds.get_dataset

    def delete_the_model_meanwhile(session: Session, id_: str, **kwargs: Any) -> Any:
        _elsewhere(settings, lambda s, st: catalog.delete_model(s, st, ids["model_id"]))
        return get_dataset(session, id_, **kwargs)

    monkeypatch.setattr(builds, "get_dataset", delete_the_model_meanwhile)
    response = client.post("/v1/builds", json=ids)
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "conflict"
    assert response.json()["error"]["field"] == "model_id"
    assert "/" not in response.json()["error"]["message"]  # no server path
    assert _counts(settings) == (0, 0, 0)


def test_a_model_deleted_while_a_build_is_submitted_is_409_in_use(
    client: TestClient, settings: Settings, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = catalog.commit_and_release

    def submit_meanwhile(session: Session, storage: Storage, shas: Any) -> None:
        _elsewhere(settings, _submitter(client, ids))
        release(session, storage, shas)

    monkeypatch.setattr(catalog, "commit_and_release", submit_meanwhile)
    response = client.delete(f"/v1/models/{ids['model_id']}")
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "in_use"
    assert error["hint"]
    assert _counts(settings) == (1, 1, 1)  # the model stays, with the build that uses it
    assert client.get(f"/v1/models/{ids['model_id']}").status_code == 200
    listing = client.get("/v1/builds", params={"model_id": ids["model_id"]}).json()
    assert listing["total"] == 1


def test_a_dataset_deleted_while_a_build_is_submitted_is_409_in_use(
    client: TestClient, settings: Settings, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    get_dataset = catalog.get_dataset

    def submit_meanwhile(session: Session, id_: str, **kwargs: Any) -> Any:
        row = get_dataset(session, id_, **kwargs)
        if kwargs.get("field") == "id":  # the deletion's lookup, not the submission's
            _elsewhere(settings, _submitter(client, ids))
        return row

    monkeypatch.setattr(catalog, "get_dataset", submit_meanwhile)
    response = client.delete(f"/v1/datasets/{ids['dataset_id']}")
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "in_use"
    assert client.get(f"/v1/datasets/{ids['dataset_id']}").status_code == 200
    assert _counts(settings)[1:] == (1, 1)
