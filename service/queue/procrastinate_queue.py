"""The queue for PostgreSQL deployments: Procrastinate (https://procrastinate.readthedocs.io).

Procrastinate keeps its jobs in its own PostgreSQL tables (``procrastinate_*``, created by
:func:`ensure_schema` at startup) and moves them between states with its own SQL functions
(defer, fetch, finish, retry, cancel, worker heartbeats). This queue drives those functions on the
connection of a trtforge database session, so a job changes state in the same transaction as its
build row:

- **One queue per requested target.** An untargeted build waits in ``trtforge.<backend>``, a
  targeted one in ``trtforge.<backend>.<digest of the target>`` (:func:`queue_name`). A worker
  fetches from the queues whose (backend, target) it serves (:func:`~service.queue.targets.
  serving_target` decides, labels included), oldest job first across them, with ``SKIP LOCKED``.
  Each job's ``lock`` is its build id: a build never runs twice at once.
- **Deferred in the build's transaction** (``JobManager.defer_job(connection=...)``): a build is
  never without its job, and a rolled-back submission leaves none. :meth:`ProcrastinateQueue.
  recover` also adopts queued builds that have no job (a database that ran the ``database`` queue
  before).
- **Workers** register with Procrastinate too (linked to it in ``trtforge_procrastinate_workers``,
  so any process serves them: an API replica or a restarted API relaying remote workers) and beat
  its heartbeat with trtforge's. A worker
  whose heartbeat goes stale (or whose process is gone from this machine) is removed
  (``prune_stalled_workers``); its running jobs become Procrastinate's stalled jobs
  (``select_stalled_jobs_by_heartbeat``) and are retried once (``retry_job``), then failed
  (``finish_job``) after ``max_attempts`` runs.
- **Cancellation**: cancelling a queued build withdraws its job (``cancel_job_by_id``) in the
  cancel's transaction, so no worker can fetch it after the cancel answers.

The build's row in trtforge's ``jobs`` table stays its job record (state, attempts, worker: what
the API, ``/v1/workers`` and ``/metrics`` show); it is written in the same transactions as
Procrastinate's job, so the two never disagree. Worker rows (targets, labels, liveness) stay in
trtforge's ``workers`` table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

from procrastinate import App, SyncPsycopgConnector, sql
from procrastinate.jobs import Job as ProcrastinateJob
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from engines.backends.base import BuildTarget
from service.db import Database
from service.db.models import BuildRow, JobRow, WorkerRow, utcnow
from service.queue.base import Job, JobState, QueuedTarget, Recovered
from service.queue.database import DatabaseQueue, worker_liveness
from service.queue.procrastinate_schema import TASK, queue_name, raw_connection
from service.queue.records import fail_lost, queued_targets, record_claim, requeue_lost
from service.queue.targets import serving_target
from service.schemas import BuildStatus, TargetRequest
from service.settings import Settings
from service.worker.recorder import add_log, reset_for_retry

__all__ = ["ProcrastinateQueue"]

_CLAIM_ROUNDS = 5
_CLEANUP_EVERY_S = 600.0
"""How often a process removes the jobs of deleted builds (at its first recovery, then this)."""


class ProcrastinateQueue(DatabaseQueue):
    """:class:`~service.queue.base.JobQueue` on Procrastinate (module docstring). Worker rows and
    the build's job record come from :class:`DatabaseQueue`; where builds wait, who runs them and
    what happens when a worker dies is Procrastinate's."""

    def __init__(self, db: Database, settings: Settings) -> None:
        super().__init__(db, settings)
        self._stale_s = settings.stale_after_s
        # never opened: every query runs on the connection of a trtforge session
        self._connector = SyncPsycopgConnector()
        self._app = App(connector=self._connector)
        self._next_cleanup = 0.0

    # -- queries on a session's connection ---------------------------------------------------

    def _one(self, session: Session, query: str, **arguments: Any) -> dict[str, Any]:
        return self._connector.execute_query_one_with_connection(
            raw_connection(session), query=sql.queries[query], **arguments
        )

    def _all(self, session: Session, query: str, **arguments: Any) -> list[dict[str, Any]]:
        return self._connector.execute_query_all_with_connection(
            raw_connection(session), query=sql.queries[query], **arguments
        )

    # -- jobs --------------------------------------------------------------------------------

    def enqueue(self, session: Session, build_id: str) -> None:
        self._withdraw_waiting(session, build_id)  # a job of an earlier run, should one wait
        super().enqueue(session, build_id)  # the job record
        session.flush()
        self._defer(session, session.get_one(BuildRow, build_id))  # fresh attempts

    def withdraw(self, session: Session, build_id: str) -> None:
        super().withdraw(session, build_id)  # the job record
        self._withdraw_waiting(session, build_id)

    def _withdraw_waiting(self, session: Session, build_id: str) -> None:
        waiting = raw_connection(session).execute(
            "SELECT id FROM procrastinate_jobs WHERE lock = %s AND status = 'todo' "
            "AND task_name = %s FOR UPDATE",
            (build_id, TASK),
        )
        for (job_id,) in waiting.fetchall():
            self._app.job_manager.cancel_job_by_id(job_id, connection=raw_connection(session))

    def _defer(self, session: Session, build: BuildRow) -> None:
        wanted = _wanted(build.requested_target)
        job = ProcrastinateJob(
            queue=queue_name(build.requested_backend, wanted),
            lock=build.id,
            queueing_lock=build.id,
            task_name=TASK,
            task_kwargs={
                "build_id": build.id,
                "backend": build.requested_backend,
                "target": None if wanted is None else wanted.model_dump(mode="json"),
            },
        )
        self._app.job_manager.defer_job(job, connection=raw_connection(session))

    def claim(self, worker_id: str, targets: Sequence[BuildTarget]) -> Job | None:
        for _ in range(_CLAIM_ROUNDS):
            with self._db.session() as session:
                labels = session.scalar(
                    select(WorkerRow.labels).where(
                        WorkerRow.id == worker_id, WorkerRow.stopped_at.is_(None)
                    )
                )
                pg_worker = _procrastinate_worker(session, worker_id)
                if labels is None or pg_worker is None:
                    session.rollback()  # declared dead: it must register again
                    return None
                queues = _servable_queues(session, targets, labels)
                if not queues:
                    session.rollback()
                    return None
                self._withdraw(session, list(queues))
                row = self._one(session, "fetch_job", queues=list(queues), worker_id=pg_worker)
                if row["id"] is None:
                    session.commit()
                    return None
                fetched = ProcrastinateJob.from_row(row)
                build = session.get(BuildRow, str(fetched.task_kwargs["build_id"]))
                if build is None or BuildStatus(build.status).terminal:
                    self._end(session, fetched.id, build)  # nothing to run; look again
                    session.commit()
                    continue
                backend, wanted = queues[fetched.queue]
                target = serving_target(backend, wanted, targets, labels)
                assert target is not None  # the queue was chosen for it
                job = Job(id=cast(int, fetched.id), build_id=build.id, attempt=fetched.attempts + 1)
                now = utcnow()
                session.execute(
                    _record(build.id).values(
                        state=JobState.RUNNING.value,
                        worker_id=worker_id,
                        claimed_at=now,
                        heartbeat_at=now,
                        attempts=job.attempt,
                    )
                )
                record_claim(session, build, worker_id, target)
                session.commit()
                return job
        return None

    def _withdraw(self, session: Session, queues: list[str] | None) -> None:
        """Cancel waiting jobs whose job record is no longer queued: ``withdraw`` does it in the
        cancel's transaction; this catches records ended by anything else (a process running the
        ``database`` queue on the same database, a deleted build)."""
        rows = raw_connection(session).execute(
            "SELECT p.id FROM procrastinate_jobs p LEFT JOIN jobs j ON j.build_id = p.lock "
            "WHERE p.status = 'todo' AND p.task_name = %s "
            "AND (j.id IS NULL OR j.state <> %s) "
            "AND (%s::varchar[] IS NULL OR p.queue_name = ANY(%s::varchar[])) "
            "FOR UPDATE OF p SKIP LOCKED",
            (TASK, JobState.QUEUED.value, queues, queues),
        )
        for (job_id,) in rows.fetchall():
            self._app.job_manager.cancel_job_by_id(job_id, connection=raw_connection(session))

    def _end(self, session: Session, job_id: int | None, build: BuildRow | None) -> None:
        """Finish a running Procrastinate job as its build ended, and its job record."""
        status = "failed"
        if build is not None and build.status == BuildStatus.SUCCEEDED.value:
            status = "succeeded"
        elif build is not None and build.status == BuildStatus.CANCELLED.value:
            status = "aborted"
        self._one(session, "finish_job", job_id=job_id, status=status, delete_job=False)
        if build is not None:
            session.execute(_record(build.id).values(state=JobState.FINISHED.value))

    def finish(self, job: Job) -> None:
        with self._db.session() as session:
            if not _held(session, job):
                session.rollback()  # recovered (and maybe claimed again) meanwhile: not ours
                return
            self._end(session, job.id, session.get(BuildRow, job.build_id))
            session.commit()

    def release(self, job: Job) -> None:
        with self._db.session() as session:
            if not _held(session, job):
                session.rollback()
                return
            build = session.get(BuildRow, job.build_id)
            if build is None or BuildStatus(build.status).terminal:
                self._end(session, job.id, build)  # it ended as the worker stopped
                session.commit()
                return
            self._retry(session, job.id)
            # a shutdown does not use up an attempt (retry_job counted one)
            raw_connection(session).execute(
                "UPDATE procrastinate_jobs SET attempts = attempts - 1 WHERE id = %s", (job.id,)
            )
            session.execute(
                _record(build.id).values(
                    state=JobState.QUEUED.value, worker_id=None, attempts=job.attempt - 1
                )
            )
            reset_for_retry(build)
            add_log(session, build.id, "Put back in the queue: its worker shut down.")
            session.commit()

    def _retry(self, session: Session, job_id: int) -> None:
        self._one(
            session,
            "retry_job",
            job_id=job_id,
            retry_at=None,  # now, by the database's clock
            new_priority=None,
            new_queue_name=None,
            new_lock=None,
        )

    # -- workers -----------------------------------------------------------------------------

    def register_worker(
        self,
        worker_id: str,
        slots: int,
        targets: Sequence[BuildTarget],
        labels: Sequence[str] = (),
    ) -> None:
        with self._db.session() as session:
            pg_worker = int(self._one(session, "register_worker")["worker_id"])
            raw_connection(session).execute(
                "INSERT INTO trtforge_procrastinate_workers (worker_id, procrastinate_worker_id) "
                "VALUES (%s, %s)",
                (worker_id, pg_worker),
            )
            session.commit()
        super().register_worker(worker_id, slots, targets, labels)

    def heartbeat(self, worker_id: str) -> bool:
        alive = super().heartbeat(worker_id)
        with self._db.session() as session:
            pg_worker = _procrastinate_worker(session, worker_id)
            if alive and pg_worker is not None:
                self._one(session, "update_heartbeat", worker_id=pg_worker)
                session.commit()
                return True
            # declared dead on one side (pruned by Procrastinate, or stopped): dead on both
            if pg_worker is not None:
                self._one(session, "unregister_worker", worker_id=pg_worker)
            session.execute(
                update(WorkerRow)
                .where(WorkerRow.id == worker_id, WorkerRow.stopped_at.is_(None))
                .values(stopped_at=utcnow())
            )
            session.commit()
        return False

    def unregister_worker(self, worker_id: str) -> None:
        with self._db.session() as session:
            pg_worker = _procrastinate_worker(session, worker_id)
            if pg_worker is not None:
                self._one(session, "unregister_worker", worker_id=pg_worker)
            session.commit()
        super().unregister_worker(worker_id)

    def depth(self) -> int:
        with self._db.session() as session:
            row = raw_connection(session).execute(
                f"SELECT count(*) {_WAITING}", (TASK, JobState.QUEUED.value)
            ).fetchone()
            return int(row[0]) if row is not None else 0

    def depth_by_target(self) -> list[QueuedTarget]:
        with self._db.session() as session:
            rows = raw_connection(session).execute(
                f"SELECT p.args->>'backend', p.args->'target', count(*) {_WAITING} "
                "GROUP BY 1, 2",
                (TASK, JobState.QUEUED.value),
            )
            return queued_targets(
                (backend, _wanted(target), jobs) for backend, target, jobs in rows.fetchall()
            )

    # -- recovery ----------------------------------------------------------------------------

    def recover(self) -> Recovered:
        with self._db.session() as session:
            # dead among the workers read: a worker that registers meanwhile is not declared dead
            dead_workers = worker_liveness(session, self._stale)[1]
            session.execute(
                update(WorkerRow)
                .where(WorkerRow.id.in_(dead_workers or {""}), WorkerRow.stopped_at.is_(None))
                .values(stopped_at=utcnow())
            )
            # a stopped worker's Procrastinate worker goes now, not once its heartbeat is stale:
            # a worker killed on this machine is seen at once
            dead = raw_connection(session).execute(
                "SELECT l.procrastinate_worker_id FROM trtforge_procrastinate_workers l "
                "JOIN workers w ON w.id = l.worker_id WHERE w.stopped_at IS NOT NULL"
            )
            for (pg_worker,) in dead.fetchall():
                self._one(session, "unregister_worker", worker_id=pg_worker)
            self._all(session, "prune_stalled_workers", seconds_since_heartbeat=self._stale_s)
            self._withdraw(session, None)
            self._adopt(session)
            if time.monotonic() >= self._next_cleanup:  # the ended jobs of deleted builds
                raw_connection(session).execute(
                    "DELETE FROM procrastinate_jobs p WHERE p.task_name = %s "
                    "AND p.status NOT IN ('todo', 'doing') "
                    "AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.id = p.lock)",
                    (TASK,),
                )
                self._next_cleanup = time.monotonic() + _CLEANUP_EVERY_S
            session.commit()
            stalled = self._all(
                session,
                "select_stalled_jobs_by_heartbeat",
                queue=None,
                task_name=TASK,
                seconds_since_heartbeat=self._stale_s,
            )
            session.rollback()
        requeued: list[str] = []
        failed: list[str] = []
        for row in stalled:
            job = ProcrastinateJob.from_row(row)
            outcome = self._recover_job(cast(int, job.id), str(job.task_kwargs["build_id"]))
            if outcome == "requeued":
                requeued.append(str(job.task_kwargs["build_id"]))
            elif outcome == "failed":
                failed.append(str(job.task_kwargs["build_id"]))
        return Recovered(requeued=tuple(requeued), failed=tuple(failed))

    def _adopt(self, session: Session) -> None:
        """Give a job to each queued build without one (the database queue ran before)."""
        orphans = raw_connection(session).execute(
            "SELECT j.build_id FROM jobs j WHERE j.state = %s AND NOT EXISTS ("
            "SELECT 1 FROM procrastinate_jobs p WHERE p.lock = j.build_id "
            "AND p.status IN ('todo', 'doing') AND p.task_name = %s) "
            "FOR UPDATE OF j SKIP LOCKED",
            (JobState.QUEUED.value, TASK),
        )
        for (build_id,) in orphans.fetchall():
            self._defer(session, session.get_one(BuildRow, build_id))

    def _recover_job(self, job_id: int, build_id: str) -> str | None:
        with self._db.session() as session:
            row = (
                raw_connection(session)
                .execute(
                    "SELECT attempts FROM procrastinate_jobs WHERE id = %s AND status = 'doing' "
                    "AND worker_id IS NULL FOR UPDATE SKIP LOCKED",
                    (job_id,),
                )
                .fetchone()
            )
            if row is None:
                session.rollback()  # recovered by another process, or its worker came back
                return None
            runs = int(row[0]) + 1
            build = session.get(BuildRow, build_id)
            if build is None or BuildStatus(build.status).terminal:
                self._end(session, job_id, build)  # it ended just before its worker died
                session.commit()
                return None
            if runs < self._max_attempts:
                self._retry(session, job_id)
                session.execute(
                    _record(build_id).values(state=JobState.QUEUED.value, worker_id=None)
                )
                requeue_lost(session, build, runs, self._max_attempts)
                session.commit()
                return "requeued"
            fail_lost(session, build, runs)
            self._end(session, job_id, build)
            session.commit()
            return "failed"


_WAITING = (
    "FROM procrastinate_jobs p JOIN jobs j ON j.build_id = p.lock "
    "WHERE p.status = 'todo' AND p.task_name = %s AND j.state = %s"
)
"""Jobs waiting for a worker (those of builds cancelled while queued are not, even before their
withdrawal)."""


def _wanted(target: object) -> TargetRequest | None:
    return None if target is None else TargetRequest.model_validate(target)


def _record(build_id: str) -> Any:
    """An update of ``build_id``'s job record."""
    return update(JobRow).where(JobRow.build_id == build_id)


def _held(session: Session, job: Job) -> bool:
    """Whether ``job`` is still this claim's (running, the same attempt), locked till commit."""
    row = raw_connection(session).execute(
        "SELECT 1 FROM procrastinate_jobs WHERE id = %s AND status = 'doing' AND attempts = %s "
        "AND args->>'build_id' = %s FOR UPDATE",
        (job.id, job.attempt - 1, job.build_id),
    )
    return row.fetchone() is not None


def _procrastinate_worker(session: Session, worker_id: str) -> int | None:
    """The Procrastinate worker of ``worker_id`` (kept until the transaction ends: FOR KEY SHARE),
    or None once it was unregistered or pruned."""
    row = raw_connection(session).execute(
        "SELECT p.id FROM trtforge_procrastinate_workers l JOIN procrastinate_workers p "
        "ON p.id = l.procrastinate_worker_id WHERE l.worker_id = %s FOR KEY SHARE OF p",
        (worker_id,),
    ).fetchone()
    return None if row is None else int(row[0])


def _servable_queues(
    session: Session, targets: Sequence[BuildTarget], labels: Sequence[str]
) -> dict[str, tuple[str, TargetRequest | None]]:
    """The queues with waiting jobs that a worker with ``targets`` and ``labels`` serves, each
    with the backend and target its builds ask for."""
    rows = raw_connection(session).execute(
        "SELECT DISTINCT ON (queue_name) queue_name, args FROM procrastinate_jobs "
        "WHERE status = 'todo' AND task_name = %s ORDER BY queue_name",
        (TASK,),
    )
    servable: dict[str, tuple[str, TargetRequest | None]] = {}
    for name, args in rows.fetchall():
        backend, wanted = str(args["backend"]), _wanted(args.get("target"))
        if serving_target(backend, wanted, targets, labels) is not None:
            servable[name] = (backend, wanted)
    return servable

