"""Projects over real HTTP (a ``trtforge serve`` that requires tokens, with its worker): a token
of another project learns nothing about a project's models, datasets, tables and builds. Every
probe of another project's id answers exactly what an unknown id answers (status and body, the
id aside), including requests whose answer would otherwise depend on the object's state (deleting
a model a build uses: 404, not 409 "in use"); the same bytes uploaded in the other project are a
new entry (201), not "already there"; listings and the dashboard show nothing of it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from service.api.auth import create_token
from service.db import Database
from service.schemas import Scope
from tests.integration.conftest import Server, running_server
from tests.unit.service.support import DATABASES, dataset_bytes, model_bytes

pytestmark = pytest.mark.reliability

FAST = {"benchmark": {"warmup_ms": 0, "iterations": 3, "duration_s": 0}}
UNKNOWN = "0" * 64
BUILD_TIMEOUT_S = 180.0


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, dict[str, dict[str, str]]]]:
    """A server that requires tokens, and bearer headers of three tokens: ``alpha`` and ``beta``
    (scope build, one project each) and ``admin`` (scope admin, project ``ops``)."""
    folder = tmp_path_factory.mktemp("projects")
    with running_server(request.param, folder, TRTFORGE_AUTH="true") as srv:
        db = Database(srv.database_url)
        headers: dict[str, dict[str, str]] = {}
        try:
            with db.session() as session:
                for who, scope, project in (
                    ("alpha", Scope.BUILD, "alpha"),
                    ("beta", Scope.BUILD, "beta"),
                    ("admin", Scope.ADMIN, "ops"),
                ):
                    _row, token = create_token(session, who, scope, project)
                    headers[who] = {"Authorization": f"Bearer {token}"}
        finally:
            db.dispose()
        yield srv, headers


def _wait(client: httpx.Client, build_id: str, who: dict[str, str]) -> dict[str, object]:
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while time.monotonic() < deadline:
        build = client.get(f"/v1/builds/{build_id}", headers=who).json()
        if build["status"] in ("succeeded", "failed", "cancelled"):
            return dict(build)
        time.sleep(0.3)
    raise AssertionError(f"build {build_id} did not end in {BUILD_TIMEOUT_S} s")


def _same_answer(
    client: httpx.Client, method: str, path: str, known: str, who: dict[str, str]
) -> None:
    """Another project's ``known`` id and an unknown id get the same answer."""
    theirs = client.request(method, path.format(known), headers=who)
    unknown = client.request(method, path.format(UNKNOWN), headers=who)
    assert theirs.status_code == unknown.status_code == 404, (method, path, theirs.text)
    if method != "HEAD":
        assert theirs.json()["error"]["code"] == "not_found"
        assert theirs.text == unknown.text.replace(UNKNOWN, known), (method, path)


def test_another_projects_objects_do_not_exist_over_http(
    server: tuple[Server, dict[str, dict[str, str]]],
) -> None:
    srv, tokens = server
    alpha, beta, admin = tokens["alpha"], tokens["beta"], tokens["admin"]
    model_data, samples = model_bytes(), dataset_bytes(count=10)
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        model = client.post("/v1/models", files={"file": ("m.onnx", model_data)}, headers=alpha)
        assert model.status_code == 201, model.text
        model_id = model.json()["id"]
        dataset = client.post(
            "/v1/datasets",
            files={"file": ("d.npz", samples)},
            data={"model_id": model_id},
            headers=alpha,
        )
        assert dataset.status_code == 201, dataset.text
        dataset_id = dataset.json()["id"]
        submitted = client.post(
            "/v1/builds", json={"model_id": model_id, "dataset_id": dataset_id, **FAST}, headers=alpha
        )
        assert submitted.status_code == 202, submitted.text
        build = _wait(client, submitted.json()["id"], alpha)
        assert build["status"] == "succeeded", build
        build_id, table_id = str(build["id"]), str(build["table_id"])

        for method, path, known in [
            ("GET", "/v1/models/{}", model_id),
            ("DELETE", "/v1/models/{}", model_id),  # in use by a build: 409 for alpha
            ("GET", "/v1/datasets/{}", dataset_id),
            ("DELETE", "/v1/datasets/{}", dataset_id),
            ("GET", "/v1/calibration-tables/{}", table_id),
            ("GET", "/v1/calibration-tables/{}?format=trt", table_id),
            ("GET", "/v1/builds/{}", build_id),
            ("GET", "/v1/builds/{}/logs", build_id),
            ("GET", "/v1/builds/{}/events", build_id),
            ("GET", "/v1/builds/{}/artifact", build_id),
            ("HEAD", "/v1/builds/{}/artifact", build_id),
            ("GET", "/v1/builds/{}/artifact/metadata", build_id),
            ("GET", "/v1/builds/{}/report", build_id),
            ("GET", "/v1/builds/{}/report?format=html", build_id),
            ("POST", "/v1/builds/{}/cancel", build_id),
            ("DELETE", "/v1/builds/{}", build_id),
        ]:
            _same_answer(client, method, path, known, beta)
        for path in ("/v1/models", "/v1/datasets", "/v1/calibration-tables", "/v1/builds"):
            listed = client.get(path, headers=beta)
            assert listed.status_code == 200 and listed.json()["total"] == 0, path
        assert client.get("/v1/models", params={"project": "alpha"}, headers=beta).status_code == 403
        dashboard = client.get("/", headers=beta)
        assert dashboard.status_code == 200
        assert build_id[:12] not in dashboard.text and model_id[:12] not in dashboard.text

        # the same bytes in beta: a new entry, not "these bytes exist"
        again = client.post("/v1/models", files={"file": ("m.onnx", model_data)}, headers=beta)
        assert again.status_code == 201, again.text
        assert again.json()["id"] != model_id
        copy = client.post(
            "/v1/datasets",
            files={"file": ("d.npz", samples)},
            data={"model_id": again.json()["id"]},
            headers=beta,
        )
        assert copy.status_code == 201 and copy.json()["id"] != dataset_id

        # alpha's are untouched; the admin sees both projects
        assert client.get(f"/v1/builds/{build_id}/artifact", headers=alpha).status_code == 200
        assert client.get("/v1/models", headers=admin).json()["total"] == 2
        assert client.get(f"/v1/builds/{build_id}", headers=admin).status_code == 200
        assert client.get("/healthz").status_code == 200
