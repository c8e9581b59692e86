"""``/v1/worker/...`` in-process: the worker scope, the queue operations, and builds run by a
worker that reaches the API only over HTTP (the real :class:`WorkerClient`, recorder and store,
through the test client's transport), with inputs fetched into its own data directory."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from engines.backends.registry import local_targets
from service.api.auth import create_token
from service.db import Database
from service.errors import ApiError, DownloadError
from service.schemas import (
    BuildStatus,
    InputFile,
    Scope,
    WorkerBuildUpdate,
    WorkerClaim,
    WorkerJob,
    WorkerRegistration,
)
from service.store.storage import Storage
from service.worker.remote import preflight
from service.worker.remote_build import fetch_entry, run_remote_build
from service.worker.remote_client import RemoteAccess, WorkerClient
from tests.unit.service.support import FAST, dataset_bytes, make_settings, model_bytes


class _Cancelled(BaseException):
    pass


class _InProcess(httpx.BaseTransport):
    """The app behind the test client, for a plain ``httpx.Client`` (whose responses must be
    sync byte streams)."""

    def __init__(self, api: TestClient) -> None:
        self._inner: httpx.BaseTransport = api._transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        body = response.read()
        return httpx.Response(
            response.status_code, headers=response.headers, content=body, request=request
        )


@pytest.fixture
def api(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(auth=True)


@pytest.fixture
def tokens(api: TestClient, db_url: str) -> dict[Scope, str]:
    db = Database(db_url)
    try:
        with db.session() as session:
            return {scope: create_token(session, scope.value, scope)[1] for scope in Scope}
    finally:
        db.dispose()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def worker_client(api: TestClient, tokens: dict[Scope, str]) -> Iterator[WorkerClient]:
    transport = _InProcess(api)
    with WorkerClient("http://testserver", tokens[Scope.WORKER], transport=transport) as client:
        yield client


@pytest.fixture
def inputs(api: TestClient, tokens: dict[Scope, str]) -> dict[str, str]:
    headers = _bearer(tokens[Scope.BUILD])
    model = api.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}, headers=headers)
    dataset = api.post(
        "/v1/datasets",
        files={"file": ("d.npz", dataset_bytes(count=10))},
        data={"model_id": model.json()["id"]},
        headers=headers,
    )
    return {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}


def _register(client: WorkerClient, worker_id: str = "far-away:1:abc") -> str:
    client.register(WorkerRegistration(id=worker_id, slots=1, targets=local_targets()))
    return worker_id


def _claimed_build(
    api: TestClient, client: WorkerClient, inputs: dict[str, str], tokens: dict[Scope, str]
) -> WorkerJob:
    """A build submitted and claimed by a worker registered for it."""
    worker_id = _register(client)
    api.post("/v1/builds", json={**inputs, **FAST}, headers=_bearer(tokens[Scope.BUILD]))
    job = client.claim(WorkerClaim(worker_id=worker_id, targets=local_targets()))
    assert job is not None
    return job


def test_only_worker_and_admin_tokens_serve_builds(api: TestClient, tokens: dict[Scope, str]) -> None:
    for scope in (Scope.WORKER, Scope.ADMIN):
        assert api.post("/v1/worker/recover", headers=_bearer(tokens[scope])).status_code == 200
    for scope in (Scope.READ, Scope.BUILD):
        refused = api.post("/v1/worker/recover", headers=_bearer(tokens[scope]))
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "forbidden")
    assert api.post("/v1/worker/recover").status_code == 401
    worker = _bearer(tokens[Scope.WORKER])
    assert api.get("/v1/models", headers=worker).status_code == 200  # it reads
    submit = api.post("/v1/builds", json={"model_id": "m", "dataset_id": "d"}, headers=worker)
    assert submit.status_code == 403  # but builds nothing of its own
    assert api.get("/v1/tokens", headers=worker).status_code == 403


def test_preflight_says_why_a_worker_takes_no_builds(
    api: TestClient, tokens: dict[Scope, str], tmp_path: Path
) -> None:
    transport = _InProcess(api)
    storage = Storage(tmp_path / "w")
    with WorkerClient("http://testserver", tokens[Scope.WORKER], transport=transport) as ok:
        assert preflight(ok, storage) is None
    with WorkerClient("http://testserver", tokens[Scope.READ], transport=transport) as reader:
        problem = preflight(reader, storage)
    assert problem is not None and "--scope worker" in problem and "refuses its token" in problem
    with WorkerClient("http://127.0.0.1:9", tokens[Scope.WORKER]) as nowhere:
        problem = preflight(nowhere, storage)
    assert problem is not None and "Cannot reach" in problem
    (tmp_path / "file").write_text("not a folder")
    with WorkerClient("http://testserver", tokens[Scope.WORKER], transport=transport) as ok:
        problem = preflight(ok, Storage(tmp_path / "file"))
    assert problem is not None and "data directory" in problem


def test_a_worker_without_the_filesystem_runs_builds_through_the_api(
    api: TestClient,
    worker_client: WorkerClient,
    inputs: dict[str, str],
    tokens: dict[Scope, str],
    tmp_path: Path,
    db_url: str,
) -> None:
    worker_id = _register(worker_client)
    assert [w.id for w in worker_client.workers()] == [worker_id]
    assert worker_client.claim(WorkerClaim(worker_id=worker_id, targets=local_targets())) is None
    headers = _bearer(tokens[Scope.BUILD])
    first = api.post("/v1/builds", json={**inputs, **FAST}, headers=headers).json()
    second = api.post(
        "/v1/builds",
        json={**inputs, "benchmark": {"warmup_ms": 0, "iterations": 4, "duration_s": 0}},
        headers=headers,
    ).json()
    settings = make_settings(tmp_path / "worker-data", db_url)  # its own data directory
    access = RemoteAccess(api_url="http://testserver", token=None, worker_id=worker_id)
    for build in (first, second):
        job = worker_client.claim(WorkerClaim(worker_id=worker_id, targets=local_targets()))
        assert job is not None and job.build_id == build["id"]
        status = run_remote_build(
            job.build_id, job.attempt, access, settings, None, _Cancelled, client=worker_client
        )
        assert status == "succeeded"
        worker_client.finish_job(job)
        done = api.get(f"/v1/builds/{build['id']}", headers=headers).json()
        assert (done["status"], done["worker_id"], done["progress"]) == (
            "succeeded",
            worker_id,
            1.0,
        )
        assert set(done["stage_seconds"]) == {"calibrate", "build", "benchmark", "evaluate"}
        artifact = api.get(f"/v1/builds/{build['id']}/artifact", headers=headers)
        assert hashlib.sha256(artifact.content).hexdigest() == done["artifact"]["sha256"]
        report = api.get(f"/v1/builds/{build['id']}/report", headers=headers).json()
        assert report["artifact"]["sha256"] == done["artifact"]["sha256"]
        assert report["artifact_metadata"]["sha256"] == done["artifact"]["sha256"]
        lines = [
            line["message"]
            for line in api.get(f"/v1/builds/{build['id']}/logs", headers=headers).json()
        ]
        assert any(line.startswith("Inputs in this worker's cache") for line in lines)
        assert "Build succeeded." in lines
    # the table the first build calibrated (stored through the API) served the second one
    assert api.get(f"/v1/builds/{second['id']}", headers=headers).json()["table_from_cache"]
    folder = tmp_path / "worker-data"
    assert (folder / "models" / inputs["model_id"] / "tiny.onnx").is_file()
    assert (folder / "datasets" / inputs["dataset_id"]).is_dir()
    assert not list((folder / "work").iterdir())
    assert not list((folder / "pins").iterdir())  # the builds' pins went with them
    assert not (folder / "blobs").exists()  # results went to the API


def test_a_bounded_worker_cache_drops_unused_inputs_and_keeps_the_running_builds(
    api: TestClient,
    worker_client: WorkerClient,
    inputs: dict[str, str],
    tokens: dict[Scope, str],
    tmp_path: Path,
    db_url: str,
) -> None:
    job = _claimed_build(api, worker_client, inputs, tokens)
    folder = tmp_path / "worker-data"
    settings = make_settings(folder, db_url, worker_cache_bytes=1)  # smaller than any input
    storage = Storage(folder)
    storage.prepare()
    stale = storage.model_dir("f" * 64)  # an input of builds long gone
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"x" * 4096)
    killed = storage.work_dir("killed-build")  # what a kill -9 left
    killed.mkdir()
    worker_id = worker_client.workers()[0].id
    access = RemoteAccess(api_url="http://testserver", token=None, worker_id=worker_id)
    status = run_remote_build(
        job.build_id, job.attempt, access, settings, None, _Cancelled, client=worker_client
    )
    assert status == "succeeded"
    assert not stale.exists() and not killed.exists()
    assert (folder / "models" / inputs["model_id"] / "tiny.onnx").is_file()  # it was in use
    headers = _bearer(tokens[Scope.BUILD])
    lines = [
        line["message"] for line in api.get(f"/v1/builds/{job.build_id}/logs", headers=headers).json()
    ]
    assert any(line.startswith("Worker cache trimmed: 1 unused input(s) removed") for line in lines)
    assert any("over TRTFORGE_WORKER_CACHE_BYTES with inputs running builds need" in line for line in lines)


def test_writes_from_a_worker_that_does_not_hold_the_build_are_refused(
    api: TestClient, worker_client: WorkerClient, inputs: dict[str, str], tokens: dict[Scope, str]
) -> None:
    holder = _register(worker_client, "holder:1:aaa")
    other = _register(worker_client, "other:1:bbb")
    build = api.post(
        "/v1/builds", json={**inputs, **FAST}, headers=_bearer(tokens[Scope.BUILD])
    ).json()
    job = worker_client.claim(WorkerClaim(worker_id=holder, targets=local_targets()))
    assert job is not None
    with pytest.raises(ApiError) as refused:
        worker_client.update(build["id"], WorkerBuildUpdate(worker_id=other, progress=0.5))
    assert (refused.value.status_code, refused.value.remote_code) == (409, "conflict")
    state = worker_client.update(
        build["id"], WorkerBuildUpdate(worker_id=holder, started=True, progress=0.25)
    )
    assert (state.status, state.cancel_requested) == (BuildStatus.QUEUED, False)
    finish = {"worker_id": other, "status": "failed", "error": {"code": "x", "message": "x"}}
    stolen = api.post(
        f"/v1/worker/builds/{build['id']}/finish",
        json=finish,
        headers=_bearer(tokens[Scope.WORKER]),
    )
    assert stolen.status_code == 409
    # the worker is declared gone: its job goes back to the queue, and with it its claim
    worker_client.release_job(job)
    with pytest.raises(ApiError) as late:
        worker_client.update(build["id"], WorkerBuildUpdate(worker_id=holder, progress=0.5))
    assert late.value.status_code == 409


def test_inputs_are_checked_against_their_sha256(
    api: TestClient,
    worker_client: WorkerClient,
    inputs: dict[str, str],
    tokens: dict[Scope, str],
    tmp_path: Path,
) -> None:
    job = _claimed_build(api, worker_client, inputs, tokens)
    plan = worker_client.plan(job.build_id)
    [file] = plan.model_files
    assert file.sha256 == hashlib.sha256(model_bytes()).hexdigest() == plan.model_id
    good = tmp_path / "good.onnx"
    worker_client.download("models", plan.model_id, file, good)
    assert good.read_bytes() == model_bytes()
    forged = InputFile(path=file.path, size_bytes=file.size_bytes, sha256="f" * 64)
    with pytest.raises(DownloadError):
        worker_client.download("models", plan.model_id, forged, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    outside = api.get(
        f"/v1/worker/models/{plan.model_id}/files/..%2F..%2Fsession.key",
        headers=_bearer(tokens[Scope.WORKER]),
    )
    assert outside.status_code == 404


def test_workers_say_where_they_run_and_why_they_take_no_builds(
    api: TestClient, worker_client: WorkerClient, tokens: dict[Scope, str]
) -> None:
    registration = WorkerRegistration(
        id="gpu-box:1:abc",
        slots=2,
        targets=local_targets(),
        hostname="gpu-box-7",
        pid=4242,
        process_tag="p4242-1700000000",
    )
    worker_client.register(registration)
    assert api.get("/readyz").json()["checks"]["workers"] == {
        "ok": True,
        "detail": "1 live worker(s)",
    }
    assert worker_client.heartbeat(registration.id, "its data directory is unusable: full")
    [listed] = worker_client.workers()
    assert (listed.hostname, listed.problem) == ("gpu-box-7", "its data directory is unusable: full")
    ready = api.get("/readyz")
    assert ready.status_code == 503
    assert "no live worker takes builds" in ready.json()["checks"]["workers"]["detail"]
    assert "its data directory is unusable" in ready.json()["checks"]["workers"]["detail"]
    assert worker_client.heartbeat(registration.id)  # healthy again
    assert worker_client.workers()[0].problem is None
    assert api.get("/readyz").json()["checks"]["workers"]["ok"]


def test_the_input_cache_is_reused_and_repaired(
    api: TestClient,
    worker_client: WorkerClient,
    inputs: dict[str, str],
    tokens: dict[Scope, str],
    tmp_path: Path,
) -> None:
    job = _claimed_build(api, worker_client, inputs, tokens)
    plan = worker_client.plan(job.build_id)
    storage = Storage(tmp_path / "w")
    storage.prepare()
    dest = storage.model_dir(plan.model_id)
    fetch_entry(worker_client, storage, "models", plan.model_id, plan.model_files, dest)
    with WorkerClient("http://127.0.0.1:9", None) as offline:  # cached: no request made
        assert fetch_entry(offline, storage, "models", plan.model_id, plan.model_files, dest) == dest
    (dest / plan.onnx_filename).write_bytes(b"truncated")
    fetch_entry(worker_client, storage, "models", plan.model_id, plan.model_files, dest)
    assert (dest / plan.onnx_filename).read_bytes() == model_bytes()
