"""Projects (tenancy): a token sees and changes its own project's models, datasets, tables and
builds only; another project's are answered 404, exactly as unknown ids are; identical uploads
in two projects are two entries; admin tokens see every project; with authentication off
everything is in ``default``, as before projects; migration 0005 puts existing rows there."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import insert, text

from engines.backends.base import BuildTarget
from service.api.auth import authenticate
from service.cli.server import register
from service.client import TrtforgeClient
from service.db import Database
from service.db.models import BuildRow, DatasetRow, ModelRow, TableRow, TokenRow
from service.projects import scoped_id
from service.schemas import BuildStatus, Scope
from tests.unit.service.support import (
    DATABASES,
    FAST,
    bearer,
    database_url,
    dataset_bytes,
    make_settings,
    model_bytes,
    run_in_process,
)

_UNKNOWN = "0" * 64


@pytest.fixture
def secured(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(auth=True)


@pytest.fixture
def alpha(db_url: str) -> dict[str, str]:
    return bearer(db_url, Scope.BUILD, "alpha")


@pytest.fixture
def beta(db_url: str) -> dict[str, str]:
    return bearer(db_url, Scope.BUILD, "beta")


@pytest.fixture
def admin(db_url: str) -> dict[str, str]:
    return bearer(db_url, Scope.ADMIN, "ops")


def _upload(
    client: TestClient, who: dict[str, str], path: str, name: str, data: bytes, **fields: str
) -> Any:
    return client.post(path, files={"file": (name, data)}, data=fields, headers=who)


def _model_and_dataset(client: TestClient, who: dict[str, str]) -> dict[str, str]:
    model = _upload(client, who, "/v1/models", "tiny.onnx", model_bytes())
    assert model.status_code in (200, 201), model.text
    dataset = _upload(
        client, who, "/v1/datasets", "d.npz", dataset_bytes(count=10), model_id=model.json()["id"]
    )
    assert dataset.status_code in (200, 201), dataset.text
    return {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}


def _assert_not_found(
    client: TestClient, who: dict[str, str], requests: list[tuple[str, str, str]]
) -> None:
    """Each ``(method, path with {}, id of another project's resource)`` answers ``who``
    exactly the 404 that the same request for an unknown id gets."""
    for method, path, known_id in requests:
        response = client.request(method, path.format(known_id), headers=who)
        unknown = client.request(method, path.format(_UNKNOWN), headers=who)
        assert response.status_code == 404, response.text
        assert unknown.status_code == 404, unknown.text
        body = response.json()
        assert set(body) == {"error"}
        assert body["error"]["code"] == "not_found"
        same = json.dumps(unknown.json()).replace(_UNKNOWN, known_id)
        assert json.dumps(body) == same


def test_a_project_never_sees_another_projects_models_and_datasets(
    secured: TestClient, alpha: dict[str, str], beta: dict[str, str]
) -> None:
    ids = _model_and_dataset(secured, alpha)
    model_id, dataset_id = ids["model_id"], ids["dataset_id"]
    _assert_not_found(
        secured,
        beta,
        [
            ("GET", "/v1/models/{}", model_id),
            ("DELETE", "/v1/models/{}", model_id),
            ("GET", "/v1/datasets/{}", dataset_id),
            ("DELETE", "/v1/datasets/{}", dataset_id),
        ],
    )
    for path in ("/v1/models", "/v1/datasets", "/v1/calibration-tables", "/v1/builds"):
        assert secured.get(path, headers=beta).json()["total"] == 0, path
    assert secured.get("/v1/models", headers=alpha).json()["total"] == 1
    # naming another project's model in an upload or a build: the unknown-model 404 too
    for response in (
        _upload(secured, beta, "/v1/datasets", "d.npz", dataset_bytes(), model_id=model_id),
        _upload(secured, beta, "/v1/calibration-tables", "t.cache", b"x", model_id=model_id),
        secured.post("/v1/builds", json=ids, headers=beta),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["field"] == "model_id"
    # a listing of another project is refused whether it exists or not (nothing to learn)
    for project in ("alpha", "no-such-project"):
        refused = secured.get("/v1/models", params={"project": project}, headers=beta)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "forbidden"
    assert secured.get("/v1/models/" + model_id, headers=alpha).status_code == 200


def test_identical_uploads_in_two_projects_are_two_entries(
    secured: TestClient, alpha: dict[str, str], beta: dict[str, str], data_dir: Path
) -> None:
    data = model_bytes()
    sha = hashlib.sha256(data).hexdigest()
    first = _upload(secured, alpha, "/v1/models", "tiny.onnx", data)
    again = _upload(secured, alpha, "/v1/models", "tiny.onnx", data)
    other = _upload(secured, beta, "/v1/models", "tiny.onnx", data)
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    a, b = first.json(), other.json()
    assert again.json()["id"] == a["id"]
    assert a["id"] != b["id"] and sha not in (a["id"], b["id"])
    assert (a["id"], b["id"]) == (scoped_id("alpha", sha), scoped_id("beta", sha))
    assert (a["project"], b["project"]) == ("alpha", "beta")
    samples = dataset_bytes()
    da = _upload(secured, alpha, "/v1/datasets", "d.npz", samples, model_id=a["id"])
    db_ = _upload(secured, beta, "/v1/datasets", "d.npz", samples, model_id=b["id"])
    assert (da.status_code, db_.status_code) == (201, 201)
    assert da.json()["sha256"] == db_.json()["sha256"] and da.json()["id"] != db_.json()["id"]
    # deleting beta's copies leaves alpha's entries and files
    assert secured.delete(f"/v1/datasets/{db_.json()['id']}", headers=beta).status_code == 204
    assert secured.delete(f"/v1/models/{b['id']}", headers=beta).status_code == 204
    assert secured.get(f"/v1/models/{a['id']}", headers=alpha).status_code == 200
    assert secured.get(f"/v1/datasets/{da.json()['id']}", headers=alpha).status_code == 200
    assert (data_dir / "models").exists() and any((data_dir / "models").rglob("*.onnx"))
    checked = _upload(secured, alpha, "/v1/datasets", "e.npz", dataset_bytes(seed=1), model_id=a["id"])
    assert checked.status_code == 201, checked.text  # alpha's model file is still there
    # and beta uploading again makes a new entry of its own, not alpha's
    back = _upload(secured, beta, "/v1/models", "tiny.onnx", data)
    assert (back.status_code, back.json()["id"]) == (201, b["id"])


def test_builds_tables_artifacts_reports_logs_and_events_stay_in_their_project(
    secured: TestClient,
    alpha: dict[str, str],
    beta: dict[str, str],
    admin: dict[str, str],
    data_dir: Path,
    db_url: str,
) -> None:
    settings = make_settings(data_dir, db_url, auth=True)
    ids = _model_and_dataset(secured, alpha)
    submitted = secured.post("/v1/builds", json={**ids, **FAST}, headers=alpha)
    assert submitted.status_code == 202, submitted.text
    build = submitted.json()
    assert build["project"] == "alpha"
    assert run_in_process(settings, build["id"]) is BuildStatus.SUCCEEDED
    done = secured.get(f"/v1/builds/{build['id']}", headers=alpha).json()
    table_id = done["table_id"]
    assert table_id and done["table_from_cache"] is False
    bid = build["id"]
    _assert_not_found(
        secured,
        beta,
        [
            ("GET", "/v1/builds/{}", bid),
            ("GET", "/v1/builds/{}/logs", bid),
            ("GET", "/v1/builds/{}/events", bid),
            ("GET", "/v1/builds/{}/artifact", bid),
            ("GET", "/v1/builds/{}/artifact/metadata", bid),
            ("GET", "/v1/builds/{}/report", bid),
            ("GET", "/v1/builds/{}/report?format=html", bid),
            ("POST", "/v1/builds/{}/cancel", bid),
            ("DELETE", "/v1/builds/{}", bid),
            ("GET", "/v1/calibration-tables/{}", table_id),
            ("GET", "/v1/calibration-tables/{}?format=trt", table_id),
        ],
    )
    for path in ("/v1/builds", "/v1/calibration-tables"):
        assert secured.get(path, headers=beta).json()["total"] == 0
    assert secured.get("/v1/builds", params={"model_id": ids["model_id"]}, headers=beta).json()[
        "items"
    ] == []
    # beta's identical request is a new build that calibrates afresh (no cache across projects)
    theirs = _model_and_dataset(secured, beta)
    second = secured.post("/v1/builds", json={**theirs, **FAST}, headers=beta)
    assert second.status_code == 202, second.text
    other = second.json()
    assert other["id"] != bid and other["cache_key"] != build["cache_key"]
    assert run_in_process(settings, other["id"]) is BuildStatus.SUCCEEDED
    other = secured.get(f"/v1/builds/{other['id']}", headers=beta).json()
    assert other["table_from_cache"] is False and other["table_id"] != table_id
    # each project holds its own tables (with auto smoothing judged: with and without it)
    held = secured.get("/v1/calibration-tables", headers=alpha).json()["total"]
    assert held >= 1 and secured.get("/v1/calibration-tables", headers=beta).json()["total"] == held
    # admins see both projects, or one
    assert secured.get("/v1/builds", headers=admin).json()["total"] == 2
    only = secured.get("/v1/builds", params={"project": "beta"}, headers=admin).json()
    assert [b["id"] for b in only["items"]] == [other["id"]]
    assert secured.get("/v1/calibration-tables", headers=admin).json()["total"] == 2 * held
    assert secured.get(f"/v1/builds/{bid}/report", headers=admin).status_code == 200
    # deleting beta's build (whose files may be byte-identical) keeps alpha's downloadable
    assert secured.delete(f"/v1/builds/{other['id']}", headers=beta).status_code == 204
    artifact = secured.get(f"/v1/builds/{bid}/artifact", headers=alpha)
    assert artifact.status_code == 200
    assert hashlib.sha256(artifact.content).hexdigest() == done["artifact"]["sha256"]
    assert secured.get(f"/v1/builds/{bid}/report", headers=alpha).status_code == 200
    events = secured.get(f"/v1/builds/{bid}/events", headers=alpha)
    assert "event: end" in events.text


def test_admins_see_every_project_and_work_in_any(
    secured: TestClient, alpha: dict[str, str], admin: dict[str, str]
) -> None:
    ids = _model_and_dataset(secured, alpha)
    assert secured.get(f"/v1/models/{ids['model_id']}", headers=admin).status_code == 200
    assert secured.get("/v1/models", headers=admin).json()["total"] == 1
    assert secured.get("/v1/models", params={"project": "gamma"}, headers=admin).json()[
        "total"
    ] == 0
    placed = secured.post(
        "/v1/models",
        params={"project": "gamma"},
        files={"file": ("t.onnx", model_bytes())},
        headers=admin,
    )
    assert placed.status_code == 201 and placed.json()["project"] == "gamma"
    created = secured.post(
        "/v1/tokens", json={"name": "g", "scope": "read", "project": "gamma"}, headers=admin
    )
    assert created.status_code == 201 and created.json()["project"] == "gamma"
    gamma = {"Authorization": f"Bearer {created.json()['token']}"}
    listed = secured.get("/v1/models", headers=gamma).json()
    assert [m["id"] for m in listed["items"]] == [placed.json()["id"]]
    tokens = {t["name"]: t["project"] for t in secured.get("/v1/tokens", headers=admin).json()}
    assert tokens == {"alpha-build": "alpha", "ops-admin": "ops", "g": "gamma"}
    bad = secured.post(
        "/v1/tokens", json={"name": "x", "scope": "read", "project": "Not A Name"}, headers=admin
    )
    assert bad.status_code == 422
    assert secured.get("/v1/models", params={"project": "../x"}, headers=admin).status_code == 422
    # an admin's build of alpha's model is alpha's
    build = secured.post("/v1/builds", json=ids, headers=admin)
    assert build.status_code == 202 and build.json()["project"] == "alpha"


def test_the_client_of_an_admin_works_in_the_project_it_names(
    secured: TestClient, alpha: dict[str, str], admin: dict[str, str], tmp_path: Path
) -> None:
    _model_and_dataset(secured, alpha)

    def through_the_app(request: httpx.Request) -> httpx.Response:
        answer = secured.request(
            request.method, str(request.url), headers=request.headers, content=request.read()
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    token = admin["Authorization"].removeprefix("Bearer ")
    model = tmp_path / "m.onnx"
    model.write_bytes(model_bytes(seed=7))
    transport = httpx.MockTransport(through_the_app)
    with TrtforgeClient("http://testserver", token, transport=transport, project="gamma") as gamma:
        placed = gamma.upload_model(model)
        assert placed.project == "gamma"
        assert [m.id for m in gamma.list_models().items] == [placed.id]
        gamma.create_token("g-reader", Scope.READ, project="gamma")
        assert {t.name for t in gamma.list_tokens()} == {"g-reader"}  # ?project= filters
    with TrtforgeClient("http://testserver", token, transport=transport) as everyone:
        assert everyone.list_models().total == 2
        assert {t.name for t in everyone.list_tokens()} == {"alpha-build", "ops-admin", "g-reader"}


def test_an_admin_build_mixing_projects_is_refused(
    secured: TestClient, alpha: dict[str, str], beta: dict[str, str], admin: dict[str, str]
) -> None:
    mine, theirs = _model_and_dataset(secured, alpha), _model_and_dataset(secured, beta)
    mixed = {"model_id": mine["model_id"], "dataset_id": theirs["dataset_id"]}
    refused = secured.post("/v1/builds", json=mixed, headers=admin)
    assert refused.status_code == 404
    assert refused.json()["error"]["field"] == "dataset_id"


def test_without_authentication_everything_is_in_default_as_before(client: TestClient) -> None:
    data = model_bytes()
    model = client.post("/v1/models", files={"file": ("t.onnx", data)})
    assert model.status_code == 201
    assert model.json()["id"] == hashlib.sha256(data).hexdigest()
    assert model.json()["project"] == "default"
    assert client.post("/v1/models", files={"file": ("t.onnx", data)}).status_code == 200
    assert client.get("/v1/models").json()["total"] == 1
    assert client.get("/v1/models", params={"project": "default"}).json()["total"] == 1


def test_tokens_create_takes_a_project(tmp_path: Path) -> None:
    group = click.Group()
    register(group)
    where = ["--data-dir", str(tmp_path)]
    runner = CliRunner()
    created = runner.invoke(
        group, ["tokens", "create", "--name", "ci", "--project", "beta", "--json", *where]
    )
    assert created.exit_code == 0, created.output
    info = json.loads(created.stdout)
    assert info["project"] == "beta"
    db = Database(f"sqlite:///{tmp_path / 'trtforge.db'}")
    with db.session() as session:
        principal = authenticate(session, f"Bearer {info['token']}", Scope.READ, required=True)
    db.dispose()
    assert (principal.project, principal.visible) == ("beta", "beta")
    assert "beta" in runner.invoke(group, ["tokens", "list", *where]).stdout
    refused = runner.invoke(group, ["tokens", "create", "--name", "x", "--project", "A B", *where])
    assert refused.exit_code == 2 and "not a project name" in refused.stderr


@pytest.fixture(params=DATABASES)
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A database with no schema: the test migrates it itself."""
    with database_url(request.param, tmp_path, migrated=False) as url:
        database = Database(url)
        yield database
        database.dispose()


def test_migration_0005_puts_existing_rows_in_default(empty_db: Database) -> None:
    _check_migration(empty_db)


def _check_migration(db: Database) -> None:
    db.migrate("0004")
    now = datetime(2026, 12, 1, tzinfo=UTC)
    rows: list[tuple[Any, dict[str, Any]]] = [
        (
            TokenRow,
            {"id": "t1", "name": "old", "scope": "build", "secret_hash": "h" * 64},
        ),
        (
            ModelRow,
            {
                "id": "m" * 64,
                "filename": "m.onnx",
                "onnx_filename": "model.onnx",
                "size_bytes": 1,
                "external_data": False,
                "info": {},
                "tensor_names": [],
            },
        ),
        (
            DatasetRow,
            {
                "id": "d" * 64,
                "sha256": "d" * 64,
                "filename": "d.npz",
                "data_filename": "dataset.npz",
                "format": "npz",
                "size_bytes": 1,
                "num_samples": 1,
                "inputs": [],
                "digest": "d" * 64,
            },
        ),
        (
            TableRow,
            {
                "id": "t" * 64,
                "model_id": "m" * 64,
                "source": "imported",
                "algorithm": "max",
                "parameters": {},
                "samples": 0,
                "num_tensors": 1,
                "digest": "x",
                "blob_sha256": "a" * 64,
                "missing_tensors": [],
            },
        ),
        (
            BuildRow,
            {
                "id": "b1",
                "cache_key": "k",
                "model_id": "m" * 64,
                "dataset_id": "d" * 64,
                "request": {},
                "spec_digest": "s",
                "backend": "",
                "backend_version": "",
                "compute_capability": "",
                "status": "succeeded",
                "stage_seconds": {},
            },
        ),
    ]
    with db.session() as session:  # core inserts: only the columns revision 0004 has
        for row, values in rows:
            session.execute(insert(row).values(created_at=now, **values))
        session.commit()
    db.migrate()
    with db.engine.connect() as conn:
        for table in ("tokens", "models", "datasets", "calibration_tables", "builds"):
            projects = conn.execute(text(f"SELECT project FROM {table}")).scalars().all()
            assert projects == ["default"], table


def test_workers_show_only_the_callers_running_builds(
    secured: TestClient, alpha: dict[str, str], beta: dict[str, str], admin: dict[str, str]
) -> None:
    ids = _model_and_dataset(secured, alpha)
    build = secured.post("/v1/builds", json=ids, headers=alpha).json()
    queue = secured.app.state.trtforge.queue  # type: ignore[attr-defined]
    cpu = [BuildTarget(backend="onnxruntime", backend_version="1.22.0", compute_capability="cpu")]
    queue.register_worker("w1", 1, cpu)
    assert queue.claim("w1", cpu) is not None

    def running(who: dict[str, str]) -> list[str]:
        (worker,) = secured.get("/v1/workers", headers=who).json()
        return list(worker["running_builds"])

    assert running(alpha) == running(admin) == [build["id"]]
    assert running(beta) == []


def test_the_dashboard_shows_a_viewer_only_their_project(
    secured: TestClient, alpha: dict[str, str], beta: dict[str, str], admin: dict[str, str]
) -> None:
    ids = _model_and_dataset(secured, alpha)
    build = secured.post("/v1/builds", json=ids, headers=alpha).json()
    assert build["id"][:12] in secured.get("/", headers=alpha).text
    assert build["id"][:12] in secured.get("/", headers=admin).text
    page = secured.get("/", headers=beta)
    assert page.status_code == 200
    assert build["id"][:12] not in page.text
    assert secured.get(f"/builds/{build['id']}", headers=beta).status_code == 404
