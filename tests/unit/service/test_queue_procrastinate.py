"""The Procrastinate queue (PostgreSQL only): jobs deferred in the build's transaction, one queue
per requested target, claims, attempts, cancellation and the recovery of dead workers' jobs
through Procrastinate's worker heartbeats and stalled jobs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text, update

from engines.backends.base import BuildTarget
from service.db import Database
from service.db.migrations.env import include_name
from service.db.models import Base, BuildRow, JobRow, WorkerRow, utcnow
from service.errors import SettingsError
from service.queue import open_queue
from service.queue.base import JobState, Recovered
from service.queue.database import DatabaseQueue
from service.schemas import BuildStatus, TargetRequest
from service.settings import QueueEngine, Settings
from service.store import builds
from service.store.storage import Storage
from tests.unit.service.support import (
    POSTGRES_ENV,
    database_url,
    enqueue_builds,
    insert_build,
    make_settings,
)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not os.environ.get(POSTGRES_ENV),
        reason=f"{POSTGRES_ENV} is not set (scripts/postgres.sh starts a server): "
        "Procrastinate runs on PostgreSQL only",
    ),
]

procrastinate_queue = pytest.importorskip("service.queue.procrastinate_queue")
ProcrastinateQueue = procrastinate_queue.ProcrastinateQueue
ensure_schema = pytest.importorskip("service.queue.procrastinate_schema").ensure_schema

CPU = [BuildTarget(backend="onnxruntime", backend_version="1.22.0", compute_capability="cpu")]
H100 = BuildTarget(
    backend="tensorrt", backend_version="10.13.0", compute_capability="9.0", device="NVIDIA H100"
)


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with database_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, pg_url: str) -> Settings:
    return make_settings(tmp_path / "data", pg_url, max_attempts=2)


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.dispose()


@pytest.fixture
def queue(db: Database, settings: Settings) -> Any:
    chosen = open_queue(db, settings)
    assert isinstance(chosen, ProcrastinateQueue)  # auto on PostgreSQL
    return chosen


def _jobs(db: Database) -> list[dict[str, Any]]:
    """Procrastinate's job rows, oldest first."""
    with db.session() as session:
        rows = session.execute(
            text(
                "SELECT id, queue_name, lock, status::text AS status, attempts, args "
                "FROM procrastinate_jobs ORDER BY id"
            )
        )
        return [dict(row._mapping) for row in rows]


def _silence(db: Database, worker_id: str) -> None:
    """Make a worker look dead to both trtforge and Procrastinate: no heartbeat for 10 min."""
    with db.session() as session:
        old = utcnow() - timedelta(minutes=10)
        session.execute(update(WorkerRow).where(WorkerRow.id == worker_id).values(heartbeat_at=old))
        session.execute(text("UPDATE procrastinate_workers SET last_heartbeat = :old"), {"old": old})
        session.commit()


def test_the_queue_follows_the_database_and_the_setting(tmp_path: Path, pg_url: str) -> None:
    sqlite = make_settings(tmp_path / "d", f"sqlite:///{tmp_path / 'x.db'}")
    assert sqlite.resolved_queue is QueueEngine.DATABASE
    assert make_settings(tmp_path / "d", pg_url).resolved_queue is QueueEngine.PROCRASTINATE
    chosen = make_settings(tmp_path / "d", pg_url, queue="database")
    assert chosen.resolved_queue is QueueEngine.DATABASE
    with pytest.raises(ValueError, match="queue procrastinate needs a PostgreSQL"):
        make_settings(tmp_path / "d", f"sqlite:///{tmp_path / 'x.db'}", queue="procrastinate")
    database = Database(pg_url)
    try:
        assert type(open_queue(database, chosen)) is DatabaseQueue
    finally:
        database.dispose()


def test_the_schema_is_applied_once_and_checked(db: Database, settings: Settings) -> None:
    ensure_schema(db)
    ensure_schema(db)  # idempotent
    assert _jobs(db) == []
    with db.engine.begin() as conn:
        conn.execute(text("DROP FUNCTION procrastinate_retry_job_v2"))
    with pytest.raises(SettingsError, match="procrastinate_retry_job_v2") as info:
        open_queue(db, settings)
    assert "TRTFORGE_QUEUE=database" in (info.value.hint or "")


def test_a_job_is_deferred_in_the_builds_transaction(db: Database, queue: Any) -> None:
    with db.session() as session:
        insert_build(session, "b1")
        queue.enqueue(session, "b1")
        session.rollback()
    assert _jobs(db) == [] and queue.depth() == 0
    enqueue_builds(db, queue, "b1")
    (job,) = _jobs(db)
    assert (job["queue_name"], job["lock"], job["status"]) == ("trtforge.auto", "b1", "todo")
    assert job["args"] == {"build_id": "b1", "backend": "auto", "target": None}
    assert queue.depth() == 1


def test_targeted_builds_wait_in_their_own_queue_for_a_matching_worker(
    db: Database, queue: Any
) -> None:
    hopper = TargetRequest(gpu="sm_90", labels=["a100"])
    enqueue_builds(db, queue, "gpu", requested_target=hopper.model_dump(mode="json"))
    enqueue_builds(db, queue, "trt", requested_backend="tensorrt")
    enqueue_builds(db, queue, "any")
    names = {job["lock"]: job["queue_name"] for job in _jobs(db)}
    assert names["any"] == "trtforge.auto" and names["trt"] == "trtforge.tensorrt"
    assert names["gpu"].startswith("trtforge.auto.") and names["gpu"] != names["any"]
    depth = [(q.requested_backend, q.target, q.jobs) for q in queue.depth_by_target()]
    assert sorted(depth, key=str) == [("auto", None, 1), ("auto", hopper, 1), ("tensorrt", None, 1)]

    queue.register_worker("cpu", 1, CPU)
    queue.register_worker("h100", 1, [H100, *CPU])  # no label a100: not for "gpu"
    queue.register_worker("h100-a100", 1, [H100, *CPU], ["a100"])
    cpu = queue.claim("cpu", CPU)
    assert cpu is not None and cpu.build_id == "any"
    assert queue.claim("cpu", CPU) is None  # the others need TensorRT or the label
    h100 = queue.claim("h100", [H100, *CPU])
    assert h100 is not None and h100.build_id == "trt"
    assert queue.claim("h100", [H100, *CPU]) is None
    labelled = queue.claim("h100-a100", [H100, *CPU])
    assert labelled is not None and labelled.build_id == "gpu"
    with db.session() as session:
        row = session.get_one(BuildRow, "gpu")
        assert (row.worker_id, row.backend, row.compute_capability) == (
            "h100-a100",
            "tensorrt",
            "9.0",
        )
    assert queue.depth() == 0 and queue.depth_by_target() == []
    running = {w.id: w.running_builds for w in queue.workers()}
    assert running == {"cpu": ["any"], "h100": ["trt"], "h100-a100": ["gpu"]}


def test_finish_release_and_attempts(db: Database, queue: Any) -> None:
    enqueue_builds(db, queue, "b1", "b2")
    queue.register_worker("w", 1, CPU)
    first = queue.claim("w", CPU)
    assert first is not None and (first.build_id, first.attempt) == ("b1", 1)
    queue.release(first)  # the worker shut down: back in the queue, the attempt not used up
    (job, _) = _jobs(db)
    assert (job["status"], job["attempts"]) == ("todo", 0)
    with db.session() as session:
        assert session.get_one(BuildRow, "b1").status == BuildStatus.QUEUED.value
        record = session.query(JobRow).filter_by(build_id="b1").one()
        assert (record.state, record.attempts, record.worker_id) == ("queued", 0, None)
    again = queue.claim("w", CPU)
    assert again is not None and (again.id, again.attempt) == (first.id, 1)
    with db.session() as session:
        session.get_one(BuildRow, "b1").status = BuildStatus.SUCCEEDED.value
        session.commit()
    queue.finish(again)
    queue.finish(again)  # a second finish changes nothing
    other = queue.claim("w", CPU)
    assert other is not None and other.build_id == "b2"
    with db.session() as session:
        session.get_one(BuildRow, "b2").status = BuildStatus.FAILED.value
        session.commit()
    queue.finish(other)
    assert [(j["lock"], j["status"], j["attempts"]) for j in _jobs(db)] == [
        ("b1", "succeeded", 1),
        ("b2", "failed", 1),
    ]
    with db.session() as session:
        states = {r.build_id: (r.state, r.attempts) for r in session.query(JobRow)}
    assert states == {"b1": ("finished", 1), "b2": ("finished", 1)}


def test_cancelling_a_queued_build_withdraws_its_job(db: Database, queue: Any) -> None:
    enqueue_builds(db, queue, "b1", "b2")
    with db.session() as session:
        cancelled = builds.cancel_build(session, queue, "b1")
        assert cancelled.status == BuildStatus.CANCELLED.value
    # withdrawn in the cancel's transaction, before any claim or recovery
    assert [(j["lock"], j["status"]) for j in _jobs(db)] == [("b1", "cancelled"), ("b2", "todo")]
    assert queue.depth() == 1
    queue.register_worker("w", 1, CPU)
    job = queue.claim("w", CPU)
    assert job is not None and job.build_id == "b2"
    assert queue.claim("w", CPU) is None
    assert [(j["lock"], j["status"]) for j in _jobs(db)] == [("b1", "cancelled"), ("b2", "doing")]
    with db.session() as session:  # submitted again: a fresh job
        build = session.get_one(BuildRow, "b1")
        build.status = BuildStatus.QUEUED.value
        queue.enqueue(session, "b1")
        session.commit()
    again = queue.claim("w", CPU)
    assert again is not None and (again.build_id, again.attempt) == ("b1", 1)


def test_a_dead_workers_job_is_requeued_once_then_failed(db: Database, queue: Any) -> None:
    enqueue_builds(db, queue, "b1")
    for attempt in (1, 2):
        worker = f"w{attempt}"
        queue.register_worker(worker, 1, CPU)
        job = queue.claim(worker, CPU)
        assert job is not None and job.attempt == attempt
        with db.session() as session:
            session.get_one(BuildRow, "b1").status = BuildStatus.BUILDING.value
            session.commit()
        assert queue.recover().requeued == ()  # its worker is alive
        assert queue.heartbeat(worker) is True
        _silence(db, worker)
        recovered = queue.recover()
        assert queue.heartbeat(worker) is False  # declared dead: it must drop the build
        assert queue.claim(worker, CPU) is None
        if attempt == 1:
            assert recovered.requeued == ("b1",)
            assert [(j["status"], j["attempts"]) for j in _jobs(db)] == [("todo", 1)]
        else:
            assert recovered.failed == ("b1",)
            assert [(j["status"], j["attempts"]) for j in _jobs(db)] == [("failed", 2)]
    with db.session() as session:
        build = session.get_one(BuildRow, "b1")
        assert (build.status, build.error_code) == ("failed", "worker_lost")
        assert "2 times" in (build.error_message or "")
        assert session.query(JobRow).filter_by(build_id="b1").one().state == "finished"
        stalled = session.execute(text("SELECT count(*) FROM procrastinate_workers")).scalar()
    assert stalled == 0  # both dead workers were removed from Procrastinate's table
    assert queue.recover() == Recovered()


def test_a_killed_workers_job_is_recovered_without_waiting_for_its_heartbeat(
    db: Database, queue: Any
) -> None:
    enqueue_builds(db, queue, "b1")
    queue.register_worker("w1", 1, CPU)
    stale = queue.claim("w1", CPU)
    assert stale is not None
    with db.session() as session:  # a process on this machine that is gone
        session.execute(
            update(WorkerRow).where(WorkerRow.id == "w1").values(process_tag="1:0")
        )
        session.commit()
    assert queue.recover().requeued == ("b1",)
    queue.register_worker("w2", 1, CPU)
    job = queue.claim("w2", CPU)
    assert job is not None and (job.build_id, job.attempt) == ("b1", 2)
    queue.finish(stale)  # the dead worker's late finish leaves the new run alone
    queue.release(stale)
    assert [(j["status"], j["attempts"]) for j in _jobs(db)] == [("doing", 1)]


def test_queued_builds_without_a_job_are_adopted(db: Database, settings: Settings) -> None:
    DatabaseQueue(db, settings).register_worker("old", 1, CPU)
    with db.session() as session:  # queued while the database queue ran
        insert_build(session, "b1")
        DatabaseQueue(db, settings).enqueue(session, "b1")
        session.commit()
    queue = open_queue(db, settings)
    assert queue.depth() == 0
    queue.recover()
    assert queue.depth() == 1
    queue.register_worker("w", 1, CPU)
    job = queue.claim("w", CPU)
    assert job is not None and job.build_id == "b1"
    with db.session() as session:
        assert session.query(JobRow).filter_by(build_id="b1").one().state == JobState.RUNNING


def test_the_jobs_of_deleted_builds_are_removed(db: Database, queue: Any, tmp_path: Path) -> None:
    enqueue_builds(db, queue, "b1", "b2")
    queue.register_worker("w", 1, CPU)
    job = queue.claim("w", CPU)
    assert job is not None
    with db.session() as session:
        session.get_one(BuildRow, "b1").status = BuildStatus.SUCCEEDED.value
        session.commit()
    queue.finish(job)
    with db.session() as session:
        builds.delete_build(session, Storage(tmp_path / "data"), "b1")
    assert queue.recover() == Recovered()
    assert [(j["lock"], j["status"]) for j in _jobs(db)] == [("b2", "todo")]


def test_a_worker_that_registers_during_a_recovery_keeps_its_build(
    db: Database, queue: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue_builds(db, queue, "b1")
    read_liveness = procrastinate_queue.worker_liveness

    def registered_meanwhile(session: Any, stale: timedelta) -> tuple[set[str], set[str]]:
        seen = read_liveness(session, stale)  # the recovery reads the workers first
        queue.register_worker("new", 1, CPU)
        assert queue.claim("new", CPU) is not None
        return seen

    monkeypatch.setattr(procrastinate_queue, "worker_liveness", registered_meanwhile)
    assert queue.recover() == Recovered()
    monkeypatch.undo()
    assert queue.heartbeat("new") is True
    assert [(j["lock"], j["status"]) for j in _jobs(db)] == [("b1", "doing")]


def test_any_process_serves_a_registered_worker(
    db: Database, queue: Any, settings: Settings
) -> None:
    # remote workers reach the queue through the API: a restarted API (or another replica)
    # finds their Procrastinate workers in the database
    enqueue_builds(db, queue, "b1", "b2")
    queue.register_worker("remote", 1, CPU)
    first = queue.claim("remote", CPU)
    assert first is not None
    restarted = ProcrastinateQueue(db, settings)
    assert restarted.heartbeat("remote") is True
    second = restarted.claim("remote", CPU)
    assert second is not None and second.build_id == "b2"
    restarted.release(second)
    restarted.unregister_worker("remote")
    with db.session() as session:
        links = session.execute(text("SELECT count(*) FROM trtforge_procrastinate_workers"))
        assert links.scalar() == 0  # the link went with its Procrastinate worker
    assert queue.heartbeat("remote") is False


def test_alembic_leaves_procrastinates_tables_alone(db: Database) -> None:
    ensure_schema(db)  # beside trtforge's migrated tables
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": include_name})
        assert compare_metadata(context, Base.metadata) == []  # no table to drop
