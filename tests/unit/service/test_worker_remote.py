"""The worker side of ``trtforge worker --api``: its command line, its queue's refusals, and a
worker that ends a build it no longer holds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from engines.backends.registry import local_targets
from service.cli.server import register
from service.errors import ServiceError
from service.schemas import BuildStatus, WorkerClaim
from service.store.storage import Storage
from service.worker.remote import RemoteQueue, RemoteWorker
from service.worker.remote_client import WorkerClient
from tests.unit.service.support import dataset_bytes, make_settings, model_bytes
from tests.unit.service.test_worker_routes import _InProcess


@pytest.fixture
def cli() -> click.Group:
    group = click.Group()
    register(group)
    return group


def test_the_worker_command_takes_an_api_or_a_database(cli: click.Group, tmp_path: Path) -> None:
    both = CliRunner().invoke(
        cli,
        [
            "worker",
            "--api",
            "http://127.0.0.1:9",
            "--database-url",
            "sqlite://",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert both.exit_code == 2
    assert "Give --api or --database-url, not both." in both.output
    shown = CliRunner().invoke(cli, ["worker", "--help"])
    assert "--api" in shown.output and "--token" in shown.output


@pytest.fixture
def api(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()  # authentication off: the anonymous caller may serve builds


@pytest.fixture
def client(api: TestClient) -> Iterator[WorkerClient]:
    with WorkerClient("http://testserver", None, transport=_InProcess(api)) as worker_client:
        yield worker_client


def test_a_remote_queue_queues_nothing_and_refuses_claims_without_its_data_directory(
    client: WorkerClient, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a folder")
    queue = RemoteQueue(client, Storage(tmp_path / "file"))
    with pytest.raises(ServiceError):
        queue.depth()
    with pytest.raises(ServiceError):
        queue.claim("w", local_targets())  # its data directory is unusable: no build taken
    assert queue.problem() is not None and "data directory" in str(queue.problem())
    usable = RemoteQueue(client, Storage(tmp_path / "data"))
    usable._storage.prepare()
    assert usable.problem() is None


def test_a_worker_does_not_end_a_build_it_no_longer_holds(
    api: TestClient, client: WorkerClient, tmp_path: Path, db_url: str
) -> None:
    model = api.post("/v1/models", files={"file": ("m.onnx", model_bytes())}).json()
    data = api.post("/v1/datasets", files={"file": ("d.npz", dataset_bytes(count=4))}).json()
    settings = make_settings(tmp_path / "worker", db_url, workers=1)
    storage = Storage(settings.data_dir)
    storage.prepare()
    first = RemoteWorker(settings, storage, client, token=None)
    second = RemoteWorker(settings, storage, client, token=None)
    for worker in (first, second):
        worker.queue.register_worker(worker.id, 1, worker.targets)
    build = api.post("/v1/builds", json={"model_id": model["id"], "dataset_id": data["id"]}).json()
    job = first.queue.claim(first.id, first.targets)
    assert job is not None
    assert first._build_status(build["id"]) is BuildStatus.QUEUED
    assert not first._cancel_requested(build["id"])
    second._end(build["id"], BuildStatus.FAILED, ("x", "not mine", ""), "")  # 409: ignored
    assert first._build_status(build["id"]) is BuildStatus.QUEUED
    api.post(f"/v1/builds/{build['id']}/cancel")
    assert first._cancel_requested(build["id"])
    first._end(build["id"], BuildStatus.CANCELLED, None, "")
    assert first._build_status(build["id"]) is BuildStatus.CANCELLED
    first.queue.finish(job)
    assert client.claim(WorkerClaim(worker_id=first.id, targets=first.targets)) is None
    assert first._build_status("0" * 32) is None
