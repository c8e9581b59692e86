"""The default queue: job rows in the service's own database (SQLite or PostgreSQL).

Jobs are inserted in the same transaction as their build row, so a build is never without its
job. Claiming is one conditional ``UPDATE ... WHERE state = 'queued'`` (plus ``SKIP LOCKED`` on
PostgreSQL), so two workers never take the same job. Workers write a heartbeat; a worker whose
heartbeat is older than ``stale_after_s``, or whose process is gone from this machine, is dead,
and :meth:`DatabaseQueue.recover` re-queues its running jobs once, then fails them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from engines.backends.base import BuildTarget
from service.db import Database
from service.db.models import BuildRow, JobRow, WorkerRow, utcnow
from service.queue.base import Job, JobState, QueuedTarget, Recovered
from service.queue.records import fail_lost, queued_targets, record_claim, requeue_lost
from service.queue.targets import serving_target
from service.schemas import BuildStatus, TargetRequest, WorkerPublic, WorkerState
from service.settings import Settings, hostname
from service.worker.processes import process_alive, process_tag
from service.worker.recorder import add_log, reset_for_retry

__all__ = ["DatabaseQueue", "worker_liveness"]

_CLAIM_RETRIES = 5
_PLAIN_WINDOW = 16
"""Untargeted jobs a claim looks at (more than one: others may be taking the first)."""
_TARGETED_PAGE = 256
_TARGETED_PAGES = 8
"""Targeted jobs a claim matches against the worker's targets and labels: pages of
``_TARGETED_PAGE`` (oldest first), at most ``_TARGETED_PAGES`` of them."""


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

    def withdraw(self, session: Session, build_id: str) -> None:
        job = session.scalar(select(JobRow).where(JobRow.build_id == build_id))
        if job is not None and job.state == JobState.QUEUED.value:
            job.state = JobState.FINISHED.value  # claims take only queued jobs

    def claim(self, worker_id: str, targets: Sequence[BuildTarget]) -> Job | None:
        for _ in range(_CLAIM_RETRIES):
            with self._db.session() as session:
                labels = session.scalar(
                    select(WorkerRow.labels).where(
                        WorkerRow.id == worker_id, WorkerRow.stopped_at.is_(None)
                    )
                )
                if labels is None:  # unknown, or declared dead: it must register again
                    session.rollback()
                    return None
                raced = False
                for job_id, target in _servable_jobs(session, targets, labels):
                    job = self._take(session, job_id, worker_id, target)
                    if job is not None:
                        return job
                    raced = True  # another worker won this one; try the next
                session.rollback()
                if not raced:
                    return None
        return None

    def _take(
        self, session: Session, job_id: int, worker_id: str, target: BuildTarget
    ) -> Job | None:
        """Claim job ``job_id`` for ``worker_id`` building for ``target`` and commit; None (and
        nothing changed) when another worker holds or took it."""
        free = session.execute(
            select(JobRow.id)
            .where(JobRow.id == job_id, JobRow.state == JobState.QUEUED.value)
            .with_for_update(skip_locked=True)
        ).first()
        if free is None:
            return None
        now = utcnow()
        taken = session.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.state == JobState.QUEUED.value)
            .values(
                state=JobState.RUNNING.value,
                worker_id=worker_id,
                claimed_at=now,
                heartbeat_at=now,
                attempts=JobRow.attempts + 1,
            )
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return None
        job = session.get_one(JobRow, job_id)
        record_claim(session, session.get_one(BuildRow, job.build_id), worker_id, target)
        session.commit()
        return Job(id=job.id, build_id=job.build_id, attempt=job.attempts)

    def finish(self, job: Job) -> None:
        with self._db.session() as session:
            session.execute(
                update(JobRow).where(*_this_claim(job)).values(state=JobState.FINISHED.value)
            )
            session.commit()

    def release(self, job: Job) -> None:
        with self._db.session() as session:
            row = session.scalar(select(JobRow).where(*_this_claim(job)))
            if row is None:
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

    def register_worker(
        self,
        worker_id: str,
        slots: int,
        targets: Sequence[BuildTarget],
        labels: Sequence[str] = (),
    ) -> None:
        with self._db.session() as session:
            session.add(
                WorkerRow(
                    id=worker_id,
                    hostname=hostname(),
                    pid=_pid(),
                    process_tag=process_tag(),
                    slots=slots,
                    targets=[target.model_dump(mode="json") for target in targets],
                    labels=sorted(set(labels)),
                )
            )
            session.commit()

    def heartbeat(self, worker_id: str) -> bool:
        with self._db.session() as session:
            session.connection()  # the time is taken once a connection is in hand, not before
            now = utcnow()  # a wait for the pool, so the beat is as fresh as it claims
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

    def depth_by_target(self) -> list[QueuedTarget]:
        with self._db.session() as session:
            waiting = session.execute(
                select(BuildRow.requested_backend, BuildRow.requested_target)
                .join(JobRow, JobRow.build_id == BuildRow.id)
                .where(JobRow.state == JobState.QUEUED.value)
            )
            return queued_targets(
                (backend, None if wanted is None else TargetRequest.model_validate(wanted), 1)
                for backend, wanted in waiting
            )

    def live_workers(self) -> int:
        with self._db.session() as session:
            return len(worker_liveness(session, self._stale)[0])

    def live_targets(self) -> list[BuildTarget]:
        with self._db.session() as session:
            live = worker_liveness(session, self._stale)[0]
            rows = session.scalars(
                select(WorkerRow)
                .where(WorkerRow.id.in_(live or {""}))
                .order_by(WorkerRow.started_at)
            )
            targets = [BuildTarget.model_validate(t) for row in rows for t in row.targets]
        return list(dict.fromkeys(targets))

    def workers(self, *, include_stopped: bool = False) -> list[WorkerPublic]:
        with self._db.session() as session:
            live = worker_liveness(session, self._stale)[0]
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
                    labels=list(row.labels),
                    state=WorkerState.LIVE if row.id in live else WorkerState.STOPPED,
                    running_builds=running.get(row.id, []),
                    started_at=row.started_at,
                    heartbeat_at=row.heartbeat_at,
                    stopped_at=row.stopped_at,
                    problem=row.problem if row.id in live else None,
                )
                for row in rows
            ]

    def recover(self) -> Recovered:
        requeued: list[str] = []
        failed: list[str] = []
        with self._db.session() as session:
            # only workers read as dead are stopped, and only their jobs (or jobs of workers
            # stopped before) recovered: a worker registering meanwhile keeps what it claims
            dead = worker_liveness(session, self._stale)[1]
            if dead:
                session.execute(
                    update(WorkerRow)
                    .where(WorkerRow.stopped_at.is_(None), WorkerRow.id.in_(dead))
                    .values(stopped_at=utcnow())
                )
            stopped = select(WorkerRow.id).where(WorkerRow.stopped_at.is_not(None))
            orphans = list(
                session.scalars(
                    select(JobRow).where(
                        JobRow.state == JobState.RUNNING.value,
                        JobRow.worker_id.is_(None)
                        | JobRow.worker_id.in_(dead or {""})
                        | JobRow.worker_id.in_(stopped),
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
            requeue_lost(session, build, job.attempts, self._max_attempts)
            session.commit()
            return "requeued"
        fail_lost(session, build, job.attempts)
        session.commit()
        return "failed"


def _servable_jobs(
    session: Session, targets: Sequence[BuildTarget], labels: Sequence[str]
) -> Iterator[tuple[int, BuildTarget]]:
    """Queued jobs a worker with ``targets`` and ``labels`` builds, oldest first, each with the
    target it builds for.

    The backend is filtered in SQL; targeted jobs (GPU, TensorRT version, labels) are matched
    here, page by page (:data:`_TARGETED_PAGE`) among those ahead of the oldest untargeted jobs,
    for at most :data:`_TARGETED_PAGES` pages. Where that bound cuts the scan short, nothing newer
    than the last job looked at is offered, so a job this worker could build is never passed over
    for a newer one.
    """
    servable = sorted({"auto", *(target.backend for target in targets)})
    queued = (
        select(JobRow.id, BuildRow.requested_backend, BuildRow.requested_target)
        .join(BuildRow, BuildRow.id == JobRow.build_id)
        .where(JobRow.state == JobState.QUEUED.value, BuildRow.requested_backend.in_(servable))
        .order_by(JobRow.id)
    )
    plain = list(
        session.execute(queued.where(BuildRow.requested_target.is_(None)).limit(_PLAIN_WINDOW))
    )
    targeted = queued.where(BuildRow.requested_target.is_not(None))
    if plain:  # an untargeted job is taken before any newer one
        targeted = targeted.where(JobRow.id < plain[-1][0])
    seen = 0
    for _ in range(_TARGETED_PAGES):
        page = list(session.execute(targeted.where(JobRow.id > seen).limit(_TARGETED_PAGE)))
        complete = len(page) < _TARGETED_PAGE  # every targeted job ahead of `plain` is in hand
        seen = page[-1][0] if page else seen
        known = plain if complete else [row for row in plain if row[0] < seen]
        plain = [row for row in plain if row not in known]
        for job_id, backend, requested in sorted([*page, *known], key=lambda row: int(row[0])):
            wanted = None if requested is None else TargetRequest.model_validate(requested)
            target = serving_target(backend, wanted, targets, labels)
            if target is not None:
                yield int(job_id), target
        if complete:
            return


def _this_claim(job: Job) -> tuple[ColumnElement[bool], ...]:
    """The job row of this claim and no other: SQLite reuses the row id of a deleted job (a build
    deleted as its worker settles it), and a recovered job may have been claimed again since."""
    return (
        JobRow.id == job.id,
        JobRow.build_id == job.build_id,
        JobRow.state == JobState.RUNNING.value,
        JobRow.attempts == job.attempt,
    )


def worker_liveness(session: Session, stale: timedelta) -> tuple[set[str], set[str]]:
    """(live, dead) among the workers not stopped, read in one query: the one definition of a
    live worker (a fresh heartbeat, and on this machine a process that still runs)."""
    limit = utcnow() - stale
    here = hostname()
    live: set[str] = set()
    dead: set[str] = set()
    for worker in session.scalars(select(WorkerRow).where(WorkerRow.stopped_at.is_(None))):
        gone = worker.hostname == here and not process_alive(worker.process_tag)
        # killed on this machine: no need to wait for its heartbeat to go stale
        (dead if worker.heartbeat_at < limit or gone else live).add(worker.id)
    return live, dead


def _pid() -> int:
    import os

    return os.getpid()
