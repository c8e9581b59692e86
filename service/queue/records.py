"""What both queues (:mod:`~service.queue.database`, :mod:`~service.queue.procrastinate_queue`)
write on a build's row as its job moves, and how they count the waiting jobs: one wording for a
claim, a re-queue after a lost worker and the failure after too many, whichever queue runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from sqlalchemy.orm import Session

from engines.backends.base import BuildTarget
from service.db.models import BuildRow, utcnow
from service.queue.base import QueuedTarget
from service.schemas import BuildStatus, TargetRequest
from service.worker.recorder import add_log, reset_for_retry

__all__ = ["fail_lost", "queued_targets", "record_claim", "requeue_lost"]


def record_claim(session: Session, build: BuildRow, worker_id: str, target: BuildTarget) -> None:
    """``worker_id`` claimed ``build`` and builds it for ``target``."""
    build.worker_id = worker_id
    build.backend = target.backend
    build.backend_version = target.backend_version
    build.compute_capability = target.compute_capability
    add_log(session, build.id, f"Claimed by worker {worker_id}: building for {target}.")


def requeue_lost(session: Session, build: BuildRow, attempt: int, max_attempts: int) -> None:
    """``build`` waits again: the worker running its ``attempt`` stopped."""
    reset_for_retry(build)
    add_log(
        session,
        build.id,
        f"Re-queued: the worker running attempt {attempt} of {max_attempts} "
        "stopped (crash, kill or lost heartbeat).",
        level="warning",
    )


def fail_lost(session: Session, build: BuildRow, runs: int) -> None:
    """``build`` failed: its worker stopped in each of its ``runs`` (``max_attempts``)."""
    build.status = BuildStatus.FAILED.value
    build.stage = None
    build.error_code = "worker_lost"
    build.error_message = (
        f"The worker running this build stopped {runs} times (crash, kill or lost heartbeat); "
        "it is not retried again."
    )
    build.error_hint = "Check the worker's log (out of memory? killed?), then submit the build again."
    build.finished_at = utcnow()
    add_log(session, build.id, build.error_message, level="error")


def queued_targets(waiting: Iterable[tuple[str, TargetRequest | None, int]]) -> list[QueuedTarget]:
    """``(requested backend, target request, jobs)`` counts summed per backend and target, in a
    stable order (:meth:`~service.queue.base.JobQueue.depth_by_target`)."""
    counts: Counter[tuple[str, str | None]] = Counter()
    for backend, target, jobs in waiting:
        counts[backend, None if target is None else target.model_dump_json()] += jobs
    return [
        QueuedTarget(
            requested_backend=backend,
            target=None if target is None else TargetRequest.model_validate_json(target),
            jobs=jobs,
        )
        for (backend, target), jobs in sorted(counts.items(), key=lambda item: str(item[0]))
    ]
