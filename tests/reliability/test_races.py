"""Races against a real ``trtforge serve`` over HTTP (SQLite, and PostgreSQL when configured):
identical uploads and identical builds from many threads at once, deleting a model while builds
of it are submitted, and deleting a build while another build publishes byte-identical files.
Never a 500; the database and the data directory stay consistent; every artifact a build links
can be downloaded with its sha256. (The exact interleavings are forced, in-process on the real
database, by tests/unit/service/test_blobs.py and test_delete_races.py.)"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Server, running_server
from tests.unit.service.support import DATABASES, dataset_bytes, model_bytes

pytestmark = pytest.mark.reliability

THREADS = 8
FAST = {"warmup_ms": 0, "iterations": 2, "duration_s": 0}


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("races")
    with running_server(request.param, folder) as srv:
        yield srv


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _together(count: int, action: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """``action(i)`` from ``count`` threads released at the same moment."""
    barrier = threading.Barrier(count)

    def run(i: int) -> httpx.Response:
        barrier.wait(10)
        return action(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def _upload(server: Server, path: str, name: str, data: bytes, **form: str) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        return client.post(path, files={"file": (name, data)}, data=form)


def _healthy(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200


def _no_500(responses: list[httpx.Response]) -> None:
    assert all(r.status_code < 500 for r in responses), [(r.status_code, r.text) for r in responses]
    for response in responses:
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] and error["message"] and "hint" in error


def test_identical_uploads_at_once_store_one_model(server: Server, http: httpx.Client) -> None:
    data = model_bytes(seed=101)
    responses = _together(
        THREADS, lambda _: _upload(server, "/v1/models", "same.onnx", data)
    )
    _no_500(responses)
    assert sorted(r.status_code for r in responses) == [200] * (THREADS - 1) + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    model_id = responses[0].json()["id"]
    assert (server.data_dir / "models" / model_id).is_dir()
    assert _files_under(server.data_dir / "tmp") == []
    listing = http.get("/v1/models", params={"limit": 500}).json()
    assert [m["id"] for m in listing["items"]].count(model_id) == 1
    _healthy(http)


def _model_and_dataset(server: Server, seed: int) -> dict[str, str]:
    model = _upload(server, "/v1/models", "m.onnx", model_bytes(seed=seed))
    assert model.status_code in (200, 201), model.text
    dataset = _upload(
        server,
        "/v1/datasets",
        "d.npz",
        dataset_bytes(count=8, seed=seed),
        model_id=model.json()["id"],
    )
    assert dataset.status_code in (200, 201), dataset.text
    return {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}


def _wait(
    http: httpx.Client,
    build_id: str,
    until: Callable[[dict[str, Any]], bool] = lambda b: False,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Poll the build until it ends (or ``until`` holds); bounded, unlike an event stream."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        build: dict[str, Any] = http.get(f"/v1/builds/{build_id}").json()
        if build["status"] in ("succeeded", "failed", "cancelled") or until(build):
            return build
        time.sleep(0.05)
    raise AssertionError(f"build {build_id} did not end in {timeout_s} s: {build}")


def test_identical_builds_at_once_make_one_build(server: Server, http: httpx.Client) -> None:
    ids = _model_and_dataset(server, seed=102)
    body = {**ids, "benchmark": FAST}
    responses = _together(THREADS, lambda _: http.post("/v1/builds", json=body))
    _no_500(responses)
    assert sorted(r.status_code for r in responses) == [200] * (THREADS - 1) + [202]
    assert len({r.json()["id"] for r in responses}) == 1
    listing = http.get("/v1/builds", params={"model_id": ids["model_id"]}).json()
    assert listing["total"] == 1
    assert _wait(http, responses[0].json()["id"])["status"] == "succeeded"
    _healthy(http)


def test_deleting_a_model_while_builds_of_it_are_submitted(
    server: Server, http: httpx.Client
) -> None:
    for round_ in range(6):
        ids = _model_and_dataset(server, seed=200 + round_)
        body = {**ids, "spec": {"precision": "fp32"}, "benchmark": FAST}

        def act(i: int, ids: dict[str, str] = ids, body: dict[str, Any] = body) -> httpx.Response:
            if i == 0:
                return http.delete(f"/v1/models/{ids['model_id']}")
            return http.post("/v1/builds", json=body)

        responses = _together(4, act)
        _no_500(responses)
        deleted, submitted = responses[0], responses[1:]
        assert deleted.status_code in (204, 409), deleted.text
        assert {r.status_code for r in submitted} <= {200, 202, 404, 409}
        made = {r.json()["id"] for r in submitted if r.status_code in (200, 202)}
        model = http.get(f"/v1/models/{ids['model_id']}")
        builds = http.get("/v1/builds", params={"model_id": ids["model_id"]}).json()
        if deleted.status_code == 204:  # no build of a deleted model exists
            assert made == set() and model.status_code == 404 and builds["total"] == 0
        else:
            assert deleted.json()["error"]["code"] == "in_use"
            assert model.status_code == 200 and len(made) == 1 and builds["total"] == 1
            build_id = made.pop()
            _wait(http, build_id)
            assert http.delete(f"/v1/builds/{build_id}").status_code == 204
            assert http.delete(f"/v1/models/{ids['model_id']}").status_code == 204
        assert http.delete(f"/v1/datasets/{ids['dataset_id']}").status_code == 204
    _healthy(http)


def _download_sha256(http: httpx.Client, build_id: str) -> str:
    response = http.get(f"/v1/builds/{build_id}/artifact")
    assert response.status_code == 200, response.text
    return hashlib.sha256(response.content).hexdigest()


def test_deleting_a_build_while_another_publishes_the_same_bytes(
    server: Server, http: httpx.Client
) -> None:
    ids = _model_and_dataset(server, seed=300)
    spec = {"precision": "fp16"}  # no calibration: quick, and the same engine every time

    def submit(iterations: int) -> dict[str, Any]:
        bench = {**FAST, "iterations": iterations}
        response = http.post("/v1/builds", json={**ids, "spec": spec, "benchmark": bench})
        assert response.status_code == 202, response.text
        build: dict[str, Any] = response.json()
        return build

    previous = _wait(http, submit(1)["id"])
    assert previous["status"] == "succeeded", previous
    shared = 0
    for iterations in range(2, 6):
        # a build with other measurements makes the same artifact; delete the previous build
        # while it runs, as late as the events let us: after its benchmark, around the publish
        current = submit(iterations)
        _wait(http, current["id"], until=lambda b: b["stage"] == "evaluate")
        deleted = http.delete(f"/v1/builds/{previous['id']}")
        assert deleted.status_code == 204, deleted.text
        done = _wait(http, current["id"])
        assert done["status"] == "succeeded", done
        sha = done["artifact"]["sha256"]
        assert _download_sha256(http, done["id"]) == sha
        shared += sha == previous["artifact"]["sha256"]
        previous = done
    assert shared >= 1, "the builds made different artifacts: this test proves nothing"
    blobs = {p.name for p in (server.data_dir / "blobs").glob("*/*")}
    assert previous["artifact"]["sha256"] in blobs
    _healthy(http)
