"""The default queue: job rows in the service's own database (SQLite or PostgreSQL).

Jobs are inserted in the same transaction as their build row, so a build is never without its
job. Claiming is one conditional ``UPDATE ... WHERE state = 'queued'`` (plus ``SKIP LOCKED`` on
PostgreSQL), so two workers never take the same job. Workers write a heartbeat; a worker whose
heartbeat is older than ``stale_after_s``, or whose process is gone from this machine, is dead,
and :meth:`DatabaseQueue.recover` re-queues its running jobs once, then fails them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from engines.backends.base import BuildTarget
from engines.backends.registry import choose_target
from service.db import Database
from service.db.models import BuildRow, JobRow, WorkerRow, utcnow
from service.queue.base import Job, JobState, Recovered
from service.schemas import BuildStatus, WorkerPublic, WorkerState
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

    def claim(self, worker_id: str, targets: Sequence[BuildTarget]) -> Job | None:
        servable = sorted({"auto", *(target.backend for target in targets)})
        for _ in range(_CLAIM_RETRIES):
            with self._db.session() as session:
                registered = session.execute(
                    select(WorkerRow.id).where(
                        WorkerRow.id == worker_id, WorkerRow.stopped_at.is_(None)
                    )
                ).first()
                if registered is None:  # unknown, or declared dead: it must register again
                    session.rollback()
                    return None
                candidate = session.execute(
                    select(JobRow.id, BuildRow.requested_backend)
                    .join(BuildRow, BuildRow.id == JobRow.build_id)
                    .where(
                        JobRow.state == JobState.QUEUED.value,
                        BuildRow.requested_backend.in_(servable),
                    )
                    .order_by(JobRow.id)
                    .limit(1)
                    .with_for_update(skip_locked=True, of=JobRow)
                ).first()
                target = None if candidate is None else choose_target(candidate[1], targets)
                if candidate is None or target is None:
                    session.rollback()
                    return None
                now = utcnow()
                taken = session.execute(
                    update(JobRow)
                    .where(JobRow.id == candidate[0], JobRow.state == JobState.QUEUED.value)
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
                job = session.get_one(JobRow, candidate[0])
                build = session.get_one(BuildRow, job.build_id)
                build.worker_id = worker_id
                build.backend = target.backend
                build.backend_version = target.backend_version
                build.compute_capability = target.compute_capability
                add_log(session, build.id, f"Claimed by worker {worker_id}: building for {target}.")
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

    def register_worker(self, worker_id: str, slots: int, targets: Sequence[BuildTarget]) -> None:
        with self._db.session() as session:
            session.add(
                WorkerRow(
                    id=worker_id,
                    hostname=hostname(),
                    pid=_pid(),
                    process_tag=process_tag(),
                    slots=slots,
                    targets=[target.model_dump(mode="json") for target in targets],
                )
            )
            session.commit()

    def heartbeat(self, worker_id: str) -> bool:
        now = utcnow()
        with self._db.session() as session:
            beat = session.execute(
                update(WorkerRow)
                .where(WorkerRow.id == worker_id, WorkerRow.stopped_at.is_(None))
                .values(heartbeat_at=now)
            )
            if beat.rowcount != 1:  # type: ignore[attr-defined]
                session.rollback()
                return False  # declared dead: its jobs are recovery's now
            session.execute(
                update(JobRow)
                .where(JobRow.worker_id == worker_id, JobRow.state == JobState.RUNNING.value)
                .values(heartbeat_at=now)
            )
            session.commit()
            return True

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

    def live_targets(self) -> list[BuildTarget]:
        with self._db.session() as session:
            live = _live_worker_ids(session, self._stale)
            rows = session.scalars(
                select(WorkerRow)
                .where(WorkerRow.id.in_(live or {""}))
                .order_by(WorkerRow.started_at)
            )
            targets = [BuildTarget.model_validate(t) for row in rows for t in row.targets]
        return list(dict.fromkeys(targets))

    def workers(self, *, include_stopped: bool = False) -> list[WorkerPublic]:
        with self._db.session() as session:
            live = _live_worker_ids(session, self._stale)
            query = select(WorkerRow).order_by(WorkerRow.started_at.desc())
            if not include_stopped:
                query = query.where(WorkerRow.id.in_(live or {""}))
            rows = list(session.scalars(query))
            running: dict[str, list[str]] = {}
            for worker_id, build_id in session.execute(
                select(JobRow.worker_id, JobRow.build_id).where(
                    JobRow.state == JobState.RUNNING.value,
                    JobRow.worker_id.in_([row.id for row in rows] or [""]),
                )
            ):
                running.setdefault(str(worker_id), []).append(build_id)
            return [
                WorkerPublic(
                    id=row.id,
                    hostname=row.hostname,
                    slots=row.slots,
                    targets=[BuildTarget.model_validate(t) for t in row.targets],
                    state=WorkerState.LIVE if row.id in live else WorkerState.STOPPED,
                    running_builds=running.get(row.id, []),
                    started_at=row.started_at,
                    heartbeat_at=row.heartbeat_at,
                    stopped_at=row.stopped_at,
                )
                for row in rows
            ]

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
