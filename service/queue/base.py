"""The job queue protocol. Jobs are small frozen JSON values; the build row holds everything else.

The protocol is kept small so that a distributed implementation on an existing queue engine can
replace the database-backed default: enqueue in the caller's transaction, claim, keep alive,
finish or release, and recover the jobs of workers that died.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from service.schemas import TargetRequest

if TYPE_CHECKING:
    from engines.backends.base import BuildTarget
    from service.schemas import WorkerPublic

__all__ = ["Job", "JobQueue", "JobState", "QueuedTarget", "Recovered"]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"


class Job(BaseModel):
    """One claimed unit of work: run build ``build_id`` (``attempt`` counts from 1)."""

    model_config = ConfigDict(frozen=True)

    id: int
    build_id: str
    attempt: int


class Recovered(BaseModel):
    """What :meth:`JobQueue.recover` did with the jobs of dead workers."""

    model_config = ConfigDict(frozen=True)

    requeued: tuple[str, ...] = ()
    """Build ids put back in the queue."""
    failed: tuple[str, ...] = ()
    """Build ids failed because they had used up their attempts."""


class QueuedTarget(BaseModel):
    """How many jobs wait for one requested backend and target (:meth:`JobQueue.depth_by_target`)."""

    model_config = ConfigDict(frozen=True)

    requested_backend: str
    target: TargetRequest | None
    """None: any worker that builds ``requested_backend``."""
    jobs: int


class JobQueue(Protocol):
    """Where builds wait for a worker."""

    def enqueue(self, session: Session, build_id: str) -> None:
        """Add a job for ``build_id`` in the caller's transaction (the caller commits)."""
        ...

    def withdraw(self, session: Session, build_id: str) -> None:
        """Take the waiting job of ``build_id`` (cancelled while queued) out of the queue, in the
        caller's transaction (the caller commits): no worker may fetch it after that commit."""
        ...

    def claim(self, worker_id: str, targets: Sequence[BuildTarget]) -> Job | None:
        """Take the oldest queued job that one of ``targets`` serves (its requested backend, and
        its requested target with the labels ``worker_id`` registered:
        :func:`service.queue.targets.serving_target`), and record on its build the target chosen
        and ``worker_id``; None when no such job waits, or when ``worker_id`` is not a live
        registered worker."""
        ...

    def finish(self, job: Job) -> None:
        """The job ended (its build is terminal)."""
        ...

    def release(self, job: Job) -> None:
        """Put a job back without counting the attempt (the worker is shutting down)."""
        ...

    def register_worker(
        self,
        worker_id: str,
        slots: int,
        targets: Sequence[BuildTarget],
        labels: Sequence[str] = (),
    ) -> None:
        """A worker with ``slots`` build slots that builds for ``targets`` and carries
        ``labels`` started."""
        ...

    def heartbeat(self, worker_id: str) -> bool:
        """The worker and the jobs it runs are alive. False when the worker had been declared
        dead (its heartbeat went stale and recovery took its jobs): it must drop the builds it
        still runs and register again under a new id."""
        ...

    def unregister_worker(self, worker_id: str) -> None: ...

    def recover(self) -> Recovered:
        """Re-queue (once) or fail the running jobs of workers that stopped without finishing."""
        ...

    def depth(self) -> int:
        """Jobs waiting for a worker."""
        ...

    def depth_by_target(self) -> list[QueuedTarget]:
        """Jobs waiting for a worker, counted by requested backend and target."""
        ...

    def live_workers(self) -> int:
        """Workers whose heartbeat is recent."""
        ...

    def live_targets(self) -> list[BuildTarget]:
        """What the live workers build for, without repeats, in registration order."""
        ...

    def workers(self, *, include_stopped: bool = False) -> list[WorkerPublic]:
        """The workers (live ones, or all), newest first, with their targets, labels and running
        builds."""
        ...
