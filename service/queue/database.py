"""The default queue: job rows in the service's own database (SQLite or PostgreSQL).

Jobs are inserted in the same transaction as their build row, so a build is never without its
job. Claiming is one conditional ``UPDATE ... WHERE state = 'queued'`` (plus ``SKIP LOCKED`` on
PostgreSQL), so two workers never take the same job. Workers write a heartbeat; a worker whose
heartbeat is older than ``stale_after_s``, or whose process is gone from this machine, is dead,
and :meth:`DatabaseQueue.recover` re-queues its running jobs once, then fails them.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db import Database
from service.db.models import BuildRow, JobRow, WorkerRow, utcnow
from service.queue.base import Job, JobState, Recovered
from service.schemas import BuildStatus
from service.settings import Settings, hostname
from service.worker.processes import process_alive, process_tag
from service.worker.recorder import add_log, reset_for_retry

__all__ = ["DatabaseQueue"]

_CLAIM_RETRIES = 5


class DatabaseQueue:
    """:class:`~service.queue.base.JobQueue` on the service database."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._stale = timedelta(seconds=settings.stale_after_s)
        self._max_attempts = settings.max_attempts

    def enqueue(self, session: Session, build_id: str) -> None:
        job = session.scalar(select(JobRow).where(JobRow.build_id == build_id))
        if job is None:
            session.add(JobRow(build_id=build_id, state=JobState.QUEUED.value, attempts=0))
        else:  # a resubmitted failed build runs again with fresh attempts
            job.state, job.attempts, job.worker_id = JobState.QUEUED.value, 0, None

    def claim(self, worker_id: str) -> Job | None:
        for _ in range(_CLAIM_RETRIES):
            with self._db.session() as session:
                candidate = session.scalar(
                    select(JobRow.id)
                    .where(JobRow.state == JobState.QUEUED.value)
                    .order_by(JobRow.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if candidate is None:
                    session.rollback()
                    return None
                now = utcnow()
                taken = session.execute(
                    update(JobRow)
                    .where(JobRow.id == candidate, JobRow.state == JobState.QUEUED.value)
                    .values(
                        state=JobState.RUNNING.value,
                        worker_id=worker_id,
                        claimed_at=now,
                        heartbeat_at=now,
                        attempts=JobRow.attempts + 1,
                    )
                )
                if taken.rowcount != 1:  # type: ignore[attr-defined]
                    session.rollback()
                    continue  # another worker won this one; try the next
                job = session.get_one(JobRow, candidate)
                session.commit()
                return Job(id=job.id, build_id=job.build_id, attempt=job.attempts)
        return None

    def finish(self, job: Job) -> None:
        with self._db.session() as session:
            session.execute(
                update(JobRow).where(JobRow.id == job.id).values(state=JobState.FINISHED.value)
            )
            session.commit()

    def release(self, job: Job) -> None:
        with self._db.session() as session:
            row = session.get(JobRow, job.id)
            if row is None or row.state != JobState.RUNNING.value:
                return
            build = session.get_one(BuildRow, row.build_id)
            if BuildStatus(build.status).terminal:  # it ended as the worker stopped
                row.state = JobState.FINISHED.value
            else:
                row.state, row.worker_id = JobState.QUEUED.value, None
                row.attempts = max(0, row.attempts - 1)
                reset_for_retry(build)
                add_log(session, build.id, "Put back in the queue: its worker shut down.")
            session.commit()

    def register_worker(self, worker_id: str, slots: int) -> None:
        with self._db.session() as session:
            session.add(
                WorkerRow(
                    id=worker_id,
                    hostname=hostname(),
                    pid=_pid(),
                    process_tag=process_tag(),
                    slots=slots,
                )
            )
            session.commit()

    def heartbeat(self, worker_id: str) -> None:
        now = utcnow()
        with self._db.session() as session:
            session.execute(
                update(WorkerRow).where(WorkerRow.id == worker_id).values(heartbeat_at=now)
            )
            session.execute(
                update(JobRow)
                .where(JobRow.worker_id == worker_id, JobRow.state == JobState.RUNNING.value)
                .values(heartbeat_at=now)
            )
            session.commit()

    def unregister_worker(self, worker_id: str) -> None:
        with self._db.session() as session:
            session.execute(
                update(WorkerRow).where(WorkerRow.id == worker_id).values(stopped_at=utcnow())
            )
            session.commit()

    def depth(self) -> int:
        with self._db.session() as session:
            return (
                session.scalar(select(func.count()).where(JobRow.state == JobState.QUEUED.value))
                or 0
            )

    def live_workers(self) -> int:
        with self._db.session() as session:
            return len(_live_worker_ids(session, self._stale))

    def recover(self) -> Recovered:
        requeued: list[str] = []
        failed: list[str] = []
        with self._db.session() as session:
            live = _live_worker_ids(session, self._stale)
            session.execute(
                update(WorkerRow)
                .where(WorkerRow.stopped_at.is_(None), WorkerRow.id.not_in(live or {""}))
                .values(stopped_at=utcnow())
            )
            orphans = list(
                session.scalars(
                    select(JobRow).where(
                        JobRow.state == JobState.RUNNING.value,
                        (JobRow.worker_id.is_(None)) | JobRow.worker_id.not_in(live or {""}),
                    )
                )
            )
            session.commit()
            for job in orphans:
                outcome = self._recover_one(session, job)
                if outcome == "requeued":
                    requeued.append(job.build_id)
                elif outcome == "failed":
                    failed.append(job.build_id)
        return Recovered(requeued=tuple(requeued), failed=tuple(failed))

    def _recover_one(self, session: Session, job: JobRow) -> str | None:
        retry = job.attempts < self._max_attempts
        taken = session.execute(
            update(JobRow)
            .where(
                JobRow.id == job.id,
                JobRow.state == JobState.RUNNING.value,
                JobRow.worker_id == job.worker_id,
            )
            .values(
                state=(JobState.QUEUED if retry else JobState.FINISHED).value,
                worker_id=None,
            )
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()  # someone else recovered it first
            return None
        build = session.get_one(BuildRow, job.build_id)
        if BuildStatus(build.status).terminal:
            session.commit()  # it ended just before its worker died: nothing to redo
            return None
        if retry:
            reset_for_retry(build)
            add_log(
                session,
                build.id,
                f"Re-queued: the worker running attempt {job.attempts} of {self._max_attempts} "
                "stopped (crash, kill or lost heartbeat).",
                level="warning",
            )
            session.commit()
            return "requeued"
        build.status = BuildStatus.FAILED.value
        build.stage = None
        build.error_code = "worker_lost"
        build.error_message = (
            f"The worker running this build stopped {job.attempts} times (crash, kill or lost "
            "heartbeat); it is not retried again."
        )
        build.error_hint = (
            "Check the worker's log (out of memory? killed?), then submit the build again."
        )
        build.finished_at = utcnow()
        add_log(session, build.id, build.error_message, level="error")
        session.commit()
        return "failed"


def _live_worker_ids(session: Session, stale: timedelta) -> set[str]:
    limit = utcnow() - stale
    here = hostname()
    live: set[str] = set()
    for worker in session.scalars(select(WorkerRow).where(WorkerRow.stopped_at.is_(None))):
        if worker.heartbeat_at < limit:
            continue
        if worker.hostname == here and not process_alive(worker.process_tag):
            continue  # killed on this machine: no need to wait for its heartbeat to go stale
        live.add(worker.id)
    return live


def _pid() -> int:
    import os

    return os.getpid()
