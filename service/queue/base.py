"""The job queue protocol. Jobs are small frozen JSON values; the build row holds everything else.

The protocol is kept small so that a distributed implementation on an existing queue engine can
replace the database-backed default: enqueue in the caller's transaction, claim, keep alive,
finish or release, and recover the jobs of workers that died.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

__all__ = ["Job", "JobQueue", "JobState", "Recovered"]


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


class JobQueue(Protocol):
    """Where builds wait for a worker."""

    def enqueue(self, session: Session, build_id: str) -> None:
        """Add a job for ``build_id`` in the caller's transaction (the caller commits)."""
        ...

    def claim(self, worker_id: str) -> Job | None:
        """Take the oldest queued job for ``worker_id``, or None when the queue is empty."""
        ...

    def finish(self, job: Job) -> None:
        """The job ended (its build is terminal)."""
        ...

    def release(self, job: Job) -> None:
        """Put a job back without counting the attempt (the worker is shutting down)."""
        ...

    def register_worker(self, worker_id: str, slots: int) -> None: ...

    def heartbeat(self, worker_id: str) -> None:
        """The worker and the jobs it runs are alive."""
        ...

    def unregister_worker(self, worker_id: str) -> None: ...

    def recover(self) -> Recovered:
        """Re-queue (once) or fail the running jobs of workers that stopped without finishing."""
        ...

    def depth(self) -> int:
        """Jobs waiting for a worker."""
        ...

    def live_workers(self) -> int:
        """Workers whose heartbeat is recent."""
        ...
