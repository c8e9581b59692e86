"""Workers running real build processes (the tiny CNN on ONNX Runtime)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update

from service.api.app import create_app
from service.db import Database
from service.db.models import WorkerRow, utcnow
from service.queue import open_queue
from service.settings import Settings
from service.store.storage import Storage
from service.worker.slots import Worker
from tests.unit.service.support import dataset_bytes, make_settings, model_bytes

SLOW = {"benchmark": {"warmup_ms": 0, "iterations": 1, "duration_s": 60}}
FAST = {"benchmark": {"warmup_ms": 0, "iterations": 3, "duration_s": 0}}


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str) -> Settings:
    return make_settings(tmp_path / "data", sqlite_url, cancel_grace_s=1.0)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def submit(client: TestClient) -> Callable[..., dict[str, object]]:
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}).json()
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", dataset_bytes())}).json()

    def make(**extra: object) -> dict[str, object]:
        body = {"model_id": model["id"], "dataset_id": dataset["id"], **extra}
        response = client.post("/v1/builds", json=body)
        assert response.status_code == 202, response.text
        return dict(response.json())

    return make


@pytest.fixture
def worker_for(settings: Settings) -> Iterator[Callable[..., Worker]]:
    started: list[tuple[Worker, Database]] = []

    def make(**overrides: object) -> Worker:
        own = settings.model_copy(update=overrides)
        db = Database(own.resolved_database_url)
        worker = Worker(own, db, Storage(own.data_dir), open_queue(db, own), slots=[None])
        worker.start()
        started.append((worker, db))
        return worker

    yield make
    for worker, db in started:
        worker.stop()
        db.dispose()


def _wait(
    client: TestClient,
    build_id: object,
    predicate: Callable[[dict[str, object]], bool],
    timeout_s: float = 90,
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        build = dict(client.get(f"/v1/builds/{build_id}").json())
        if predicate(build):
            return build
        time.sleep(0.2)
    raise AssertionError(f"build {build_id} never got there: {build}")


def _ended(build: dict[str, object]) -> bool:
    return build["status"] in ("succeeded", "failed", "cancelled")


def test_worker_runs_queued_builds_in_child_processes(
    client: TestClient, submit: Callable[..., dict[str, object]], worker_for: Callable[..., Worker]
) -> None:
    build = submit(**FAST)
    worker_for()
    done = _wait(client, build["id"], _ended)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert client.get("/readyz").json()["checks"]["workers"]["ok"]


def test_cancel_kills_a_build_that_does_not_reach_a_stage_boundary(
    client: TestClient,
    settings: Settings,
    submit: Callable[..., dict[str, object]],
    worker_for: Callable[..., Worker],
) -> None:
    build = submit(**SLOW)
    worker = worker_for()
    _wait(client, build["id"], lambda b: b["status"] == "benchmarking")
    started = time.monotonic()
    assert client.post(f"/v1/builds/{build['id']}/cancel").status_code == 202
    done = _wait(client, build["id"], _ended, timeout_s=30)
    assert done["status"] == "cancelled"
    assert time.monotonic() - started < 20  # stopped (or killed after the grace), not after 60 s
    _until(lambda: worker.running_builds == [])  # the slot settles the ended child
    assert not (settings.data_dir / "work" / str(build["id"])).exists()


def test_builds_past_the_timeout_are_killed_and_failed(
    client: TestClient, submit: Callable[..., dict[str, object]], worker_for: Callable[..., Worker]
) -> None:
    build = submit(**SLOW)
    worker_for(build_timeout_s=4.0)
    done = _wait(client, build["id"], _ended, timeout_s=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "build_timeout"  # type: ignore[index]


def test_stopping_a_worker_puts_its_build_back_without_using_an_attempt(
    client: TestClient, submit: Callable[..., dict[str, object]], worker_for: Callable[..., Worker]
) -> None:
    build = submit(**SLOW)
    worker = worker_for()
    _wait(client, build["id"], lambda b: b["status"] == "benchmarking")
    worker.stop()
    queued = client.get(f"/v1/builds/{build['id']}").json()
    assert (queued["status"], queued["attempts"], queued["progress"]) == ("queued", 0, 0.0)
    logs = client.get(f"/v1/builds/{build['id']}/logs").json()
    assert "worker shut down" in logs[-1]["message"]


def _rename_table(settings: Settings, old: str, new: str) -> None:
    """A real database fault: the queue's table disappears (and comes back)."""
    db = Database(settings.resolved_database_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))
    finally:
        db.dispose()


def _until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_a_slot_survives_database_errors_says_so_and_recovers(
    client: TestClient,
    settings: Settings,
    submit: Callable[..., dict[str, object]],
    worker_for: Callable[..., Worker],
) -> None:
    worker = worker_for()
    _rename_table(settings, "jobs", "jobs_away")
    try:
        _until(lambda: not worker.healthy)
        detail = worker.health_detail()
        assert "slot 0" in detail and "jobs" in detail  # names the failing slot and the error
    finally:
        _rename_table(settings, "jobs_away", "jobs")
    build = submit(**FAST)
    done = _wait(client, build["id"], _ended)
    assert done["status"] == "succeeded" and done["worker_id"] == worker.id
    _until(lambda: worker.healthy)  # the round that ran the build ends once it is settled
    assert worker.health_detail() == "1 slot(s) healthy"


def test_readyz_reports_the_in_process_workers_failing_slots(settings: Settings) -> None:
    # SQLite: a renamed table is a real fault there (psycopg's prepared statements would follow
    # the table's OID on PostgreSQL, so the rename breaks nothing)
    with TestClient(create_app(settings.model_copy(update={"workers": 1}))) as client:
        _readyz_follows_the_slots(settings, client)


def _readyz_follows_the_slots(settings: Settings, client: TestClient) -> None:
    _until(lambda: client.get("/readyz").status_code == 200)
    assert client.get("/readyz").json()["checks"]["slots"] == {
        "ok": True,
        "detail": "1 slot(s) healthy",
    }
    _rename_table(settings, "jobs", "jobs_away")
    try:
        _until(lambda: not client.get("/readyz").json()["checks"]["slots"]["ok"])
        answer = client.get("/readyz")
        assert answer.status_code == 503 and "slot 0" in answer.json()["error"]["message"]
    finally:
        _rename_table(settings, "jobs_away", "jobs")
    _until(lambda: client.get("/readyz").status_code == 200)


def test_a_worker_declared_dead_drops_its_build_and_rejoins_under_a_new_id(
    client: TestClient,
    settings: Settings,
    submit: Callable[..., dict[str, object]],
    worker_for: Callable[..., Worker],
) -> None:
    build = submit(**SLOW)
    worker = worker_for()
    _wait(client, build["id"], lambda b: b["status"] == "benchmarking")
    first = worker.id
    db = Database(settings.resolved_database_url)
    try:  # another worker finds its heartbeat stale (as after a long database outage)
        with db.session() as session:
            session.execute(
                update(WorkerRow)
                .where(WorkerRow.id == first)
                .values(heartbeat_at=utcnow() - timedelta(minutes=10))
            )
            session.commit()
        assert open_queue(db, settings).recover().requeued == (build["id"],)
    finally:
        db.dispose()
    _until(lambda: worker.id != first)  # the next heartbeat told it; it registered again
    again = _wait(client, build["id"], lambda b: b["worker_id"] == worker.id)
    assert again["status"] not in ("failed", "cancelled")  # the build lives on, run again
    messages = [line["message"] for line in client.get(f"/v1/builds/{build['id']}/logs").json()]
    assert any(m.startswith("Re-queued") for m in messages)
    assert client.post(f"/v1/builds/{build['id']}/cancel").status_code == 202
    final = _wait(client, build["id"], _ended, timeout_s=30)
    assert final["status"] == "cancelled", (final["error"], client.get(f"/v1/builds/{build['id']}/logs").json()[-4:])


@pytest.mark.slow
def test_cancel_stops_a_running_build_within_a_second_or_two(
    client: TestClient,
    settings: Settings,
    submit: Callable[..., dict[str, object]],
    worker_for: Callable[..., Worker],
) -> None:
    # the default grace; the build is mid-benchmark (60 s of timed queries), far from a boundary
    build = submit(**SLOW)
    worker_for(cancel_grace_s=3.0)
    _wait(client, build["id"], lambda b: b["status"] == "benchmarking")
    started = time.monotonic()
    assert client.post(f"/v1/builds/{build['id']}/cancel").status_code == 202
    done = _wait(client, build["id"], _ended, timeout_s=30)
    latency = time.monotonic() - started
    assert done["status"] == "cancelled"
    assert latency < 2.5, f"cancel took {latency:.1f} s"
    messages = [line["message"] for line in client.get(f"/v1/builds/{build['id']}/logs").json()]
    assert messages[-1] == "Build cancelled."  # it stopped itself; nothing had to be killed
    assert not (settings.data_dir / "work" / str(build["id"])).exists()
