"""Build jobs: the queue protocol (:mod:`.base`), the database-backed queue that ships as the
default (:mod:`.database`) and which worker may build what (:mod:`.targets`). The worker that
runs claimed jobs is :mod:`service.worker`."""

from __future__ import annotations

from service.db import Database
from service.queue.base import Job, JobQueue, JobState, QueuedTarget, Recovered
from service.queue.database import DatabaseQueue
from service.settings import Settings

__all__ = [
    "DatabaseQueue",
    "Job",
    "JobQueue",
    "JobState",
    "QueuedTarget",
    "Recovered",
    "open_queue",
]


def open_queue(db: Database, settings: Settings) -> JobQueue:
    """The queue the settings choose, on ``db`` (the one place that decides)."""
    return DatabaseQueue(db, settings)
