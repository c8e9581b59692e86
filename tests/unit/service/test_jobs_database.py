from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from engines.backends.base import BuildTarget
from service.db import Database
from service.db.models import BuildLogRow, BuildRow, JobRow, WorkerRow, utcnow
from service.queue import database as queue_database
from service.queue.base import JobState, Recovered
from service.queue.database import DatabaseQueue
from service.schemas import BuildStatus
from service.settings import Settings
from tests.unit.service.support import (
    QUEUES,
    enqueue_builds,
    insert_build,
    make_queue,
    make_settings,
)

CPU = [BuildTarget(backend="onnxruntime", backend_version="1.22.0", compute_capability="cpu")]
H100 = BuildTarget(
    backend="tensorrt", backend_version="10.13.0", compute_capability="9.0", device="NVIDIA H100"
)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path / "data", db_url, max_attempts=2)


@pytest.fixture(params=QUEUES)
def queue(request: pytest.FixtureRequest, db: Database, settings: Settings) -> DatabaseQueue:
    return make_queue(request.param, db, settings)


def test_jobs_are_claimed_oldest_first_and_once(db: Database, queue: DatabaseQueue) -> None:
    enqueue_builds(db, queue, "b1", "b2")
    assert queue.depth() == 2
    queue.register_worker("w", 1, CPU)
    first, second = queue.claim("w", CPU), queue.claim("w", CPU)
    assert first is not None and second is not None
    assert (first.build_id, first.attempt, second.build_id) == ("b1", 1, "b2")
    assert queue.claim("w", CPU) is None
    assert queue.depth() == 0


def test_enqueue_is_part_of_the_callers_transaction(db: Database, queue: DatabaseQueue) -> None:
    with db.session() as session:
        insert_build(session, "b1")
        queue.enqueue(session, "b1")
        session.rollback()
    assert queue.depth() == 0
    queue.register_worker("w", 1, CPU)
    assert queue.claim("w", CPU) is None


def test_concurrent_workers_never_share_a_job(db: Database, queue: DatabaseQueue) -> None:
    ids = [f"b{i:02d}" for i in range(12)]
    enqueue_builds(db, queue, *ids)
    claimed: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        queue.register_worker(name, 1, CPU)
        while (job := queue.claim(name, CPU)) is not None:
            with lock:
                claimed.append(job.build_id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ids


def _kill_worker(db: Database, worker_id: str) -> None:
    """Make a registered worker look dead: silent for longer than stale_after_s."""
    with db.session() as session:
        session.execute(
            update(WorkerRow)
            .where(WorkerRow.id == worker_id)
            .values(heartbeat_at=utcnow() - timedelta(minutes=10))
        )
        session.commit()


def test_jobs_of_a_dead_worker_are_requeued_once_then_failed(
    db: Database, queue: DatabaseQueue
) -> None:
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
        _kill_worker(db, worker)
        recovered = queue.recover()
        if attempt == 1:
            assert recovered.requeued == ("b1",)
        else:
            assert recovered.failed == ("b1",)
    with db.session() as session:
        build = session.get_one(BuildRow, "b1")
        assert build.status == BuildStatus.FAILED.value
        assert build.error_code == "worker_lost"
        assert "2 times" in (build.error_message or "")
        messages = [r.message for r in session.query(BuildLogRow).order_by(BuildLogRow.id)]
        assert any(m.startswith("Re-queued") for m in messages)
        assert session.get_one(WorkerRow, "w1").stopped_at is not None
    queue.register_worker("w3", 1, CPU)
    assert queue.claim("w3", CPU) is None


def test_requeued_build_is_reset(db: Database, queue: DatabaseQueue) -> None:
    enqueue_builds(db, queue, "b1")
    queue.register_worker("w1", 1, CPU)
    assert queue.claim("w1", CPU) is not None
    with db.session() as session:
        build = session.get_one(BuildRow, "b1")
        build.status, build.stage, build.progress = "calibrating", "calibrate", 0.3
        build.stage_seconds = {"calibrate": 1.0}
        session.commit()
    _kill_worker(db, "w1")
    queue.recover()
    with db.session() as session:
        build = session.get_one(BuildRow, "b1")
        assert (build.status, build.stage, build.progress, build.stage_seconds) == (
            "queued",
            None,
            0.0,
            {},
        )


def test_release_puts_a_job_back_without_using_an_attempt(
    db: Database, queue: DatabaseQueue
) -> None:
    enqueue_builds(db, queue, "b1")
    queue.register_worker("w", 1, CPU)
    job = queue.claim("w", CPU)
    assert job is not None
    queue.release(job)
    again = queue.claim("w", CPU)
    assert again is not None and again.attempt == 1


def test_release_of_an_ended_build_finishes_its_job(db: Database, queue: DatabaseQueue) -> None:
    enqueue_builds(db, queue, "b1")
    queue.register_worker("w", 1, CPU)
    job = queue.claim("w", CPU)
    assert job is not None
    with db.session() as session:
        session.get_one(BuildRow, "b1").status = BuildStatus.SUCCEEDED.value
        session.commit()
    queue.release(job)
    assert queue.depth() == 0
    with db.session() as session:
        assert session.get_one(JobRow, job.id).state == JobState.FINISHED.value


def test_finishing_a_deleted_builds_job_leaves_a_new_job_with_its_row_id_alone(
    db: Database, queue: DatabaseQueue
) -> None:
    # the build is deleted (with its job) as its worker settles it; SQLite then gives the next
    # job the same row id, and the late finish() must not end that job without running it
    enqueue_builds(db, queue, "b1")
    queue.register_worker("w", 1, CPU)
    job = queue.claim("w", CPU)
    assert job is not None
    with db.session() as session:
        session.delete(session.get_one(JobRow, job.id))
        session.delete(session.get_one(BuildRow, "b1"))
        session.commit()
    enqueue_builds(db, queue, "b2")
    queue.finish(job)
    queue.release(job)
    again = queue.claim("w", CPU)
    assert again is not None and again.build_id == "b2"


# the database queue's own row bookkeeping (test_queue_procrastinate.py has its own)
@pytest.mark.parametrize("queue", ["database"], indirect=True)
def test_a_stale_finish_leaves_the_next_claim_of_the_job_running(
    db: Database, queue: DatabaseQueue
) -> None:
    enqueue_builds(db, queue, "b1")
    queue.register_worker("w", 1, CPU)
    first = queue.claim("w", CPU)
    assert first is not None
    queue.release(first)  # put back; claimed again, as after a recovery
    queue.register_worker("w2", 1, CPU)
    second = queue.claim("w2", CPU)
    assert second is not None and second.id == first.id
    with db.session() as session:  # recovery had counted the first attempt
        session.get_one(JobRow, first.id).attempts = 2
        session.commit()
    queue.finish(first)
    with db.session() as session:
        assert session.get_one(JobRow, first.id).state == JobState.RUNNING.value


def test_heartbeats_keep_workers_live(db: Database, queue: DatabaseQueue) -> None:
    queue.register_worker("w1", 2, CPU)
    assert queue.live_workers() == 1
    _kill_worker(db, "w1")
    assert queue.live_workers() == 0
    queue.heartbeat("w1")
    assert queue.live_workers() == 1
    queue.unregister_worker("w1")
    assert queue.live_workers() == 0


def test_builds_go_to_workers_that_build_their_backend(db: Database, queue: DatabaseQueue) -> None:
    with db.session() as session:
        insert_build(session, "trt", requested_backend="tensorrt")
        insert_build(session, "any")
        insert_build(session, "ort", requested_backend="onnxruntime")
        for build_id in ("trt", "any", "ort"):
            queue.enqueue(session, build_id)
        session.commit()
    queue.register_worker("cpu-worker", 1, CPU)
    queue.register_worker("gpu-worker", 1, [H100, *CPU])
    # a CPU worker skips the TensorRT build and takes the others, oldest first
    taken = [queue.claim("cpu-worker", CPU), queue.claim("cpu-worker", CPU)]
    assert [job.build_id for job in taken if job] == ["any", "ort"]
    assert queue.claim("cpu-worker", CPU) is None
    job = queue.claim("gpu-worker", [H100, *CPU])
    assert job is not None and job.build_id == "trt"
    with db.session() as session:
        rows = {row.id: row for row in session.query(BuildRow)}
        # each row records the worker and the target that worker chose for it
        assert (rows["trt"].worker_id, rows["trt"].backend) == ("gpu-worker", "tensorrt")
        assert (rows["trt"].backend_version, rows["trt"].compute_capability) == ("10.13.0", "9.0")
        assert (rows["any"].worker_id, rows["any"].backend) == ("cpu-worker", "onnxruntime")
        assert rows["any"].compute_capability == "cpu"
        logs = [line.message for line in session.query(BuildLogRow).filter_by(build_id="trt")]
        assert any("gpu-worker" in m and "NVIDIA H100, sm 9.0" in m for m in logs), logs


def test_auto_builds_take_the_workers_preferred_target(db: Database, queue: DatabaseQueue) -> None:
    enqueue_builds(db, queue, "b1")
    queue.register_worker("gpu-worker", 1, [*CPU, H100])
    assert queue.claim("gpu-worker", [*CPU, H100]) is not None
    with db.session() as session:
        assert session.get_one(BuildRow, "b1").backend == "tensorrt"  # TensorRT before ORT


def test_live_targets_are_the_live_workers_targets(db: Database, queue: DatabaseQueue) -> None:
    assert queue.live_targets() == []
    queue.register_worker("w1", 1, CPU)
    queue.register_worker("w2", 1, [H100, *CPU])
    assert queue.live_targets() == [*CPU, H100]
    queue.unregister_worker("w2")
    assert queue.live_targets() == CPU


def test_a_worker_declared_dead_learns_it_and_claims_nothing_until_it_registers_again(
    db: Database, queue: DatabaseQueue
) -> None:
    enqueue_builds(db, queue, "b1", "b2")
    queue.register_worker("w1", 1, CPU)
    assert queue.heartbeat("w1") is True
    job = queue.claim("w1", CPU)
    assert job is not None
    _kill_worker(db, "w1")  # its heartbeat went stale (a database outage, a long pause)
    assert queue.recover().requeued == ("b1",)
    assert queue.heartbeat("w1") is False  # declared dead: it must drop b1 and rejoin
    assert queue.claim("w1", CPU) is None
    assert queue.live_workers() == 0
    queue.register_worker("w1-again", 1, CPU)
    assert queue.claim("w1-again", CPU) is not None


def test_a_live_workers_builds_are_never_recovered_from_under_it(
    db: Database, queue: DatabaseQueue
) -> None:
    enqueue_builds(db, queue, "b1")
    queue.register_worker("w1", 1, CPU)
    assert queue.claim("w1", CPU) is not None
    for _ in range(3):  # other workers recover again and again while w1 heartbeats
        assert queue.heartbeat("w1") is True
        assert queue.recover() == Recovered()
    with db.session() as session:
        assert session.get_one(WorkerRow, "w1").stopped_at is None
        assert session.scalars(select(JobRow.state)).one() == JobState.RUNNING.value


# the database queue's liveness read (test_queue_procrastinate.py has the same for its own)
@pytest.mark.parametrize("queue", ["database"], indirect=True)
def test_a_worker_that_registers_during_a_recovery_keeps_its_build(
    db: Database, queue: DatabaseQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue_builds(db, queue, "b1")
    queue.register_worker("old", 1, CPU)
    _kill_worker(db, "old")
    read_liveness = queue_database.worker_liveness

    def registered_meanwhile(session: Session, stale: timedelta) -> tuple[set[str], set[str]]:
        seen = read_liveness(session, stale)  # the recovery reads the workers first
        queue.register_worker("new", 1, CPU)
        assert queue.claim("new", CPU) is not None
        return seen

    monkeypatch.setattr(queue_database, "worker_liveness", registered_meanwhile)
    assert queue.recover() == Recovered()
    monkeypatch.undo()
    assert queue.heartbeat("new") is True
    with db.session() as session:
        assert session.get_one(WorkerRow, "old").stopped_at is not None
        assert session.get_one(WorkerRow, "new").stopped_at is None
        assert session.scalars(select(JobRow.state)).one() == JobState.RUNNING.value
