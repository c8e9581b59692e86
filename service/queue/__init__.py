"""Build jobs: the queue protocol (:mod:`.base`), the database-backed queue that ships as the
default (:mod:`.database`) and which worker may build what (:mod:`.targets`). The worker that
runs claimed jobs is :mod:`service.worker`."""

from __future__ import annotations

from service.db import Database
from service.errors import SettingsError
from service.queue.base import Job, JobQueue, JobState, QueuedTarget, Recovered
from service.queue.database import DatabaseQueue
from service.settings import QueueEngine, Settings

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
    """The queue the settings choose, on ``db`` (the one place that decides): Procrastinate's
    on PostgreSQL (its schema applied first), the database queue on SQLite (``TRTFORGE_QUEUE``)."""
    if settings.resolved_queue is not QueueEngine.PROCRASTINATE:
        return DatabaseQueue(db, settings)
    try:
        from service.queue.procrastinate_queue import ProcrastinateQueue
        from service.queue.procrastinate_schema import ensure_schema
    except ImportError as exc:
        raise SettingsError(
            f"The Procrastinate queue cannot be loaded: {exc}.",
            hint="Install trtforge[postgres] (it brings procrastinate), or set "
            "TRTFORGE_QUEUE=database.",
            field="queue",
        ) from exc
    ensure_schema(db)
    return ProcrastinateQueue(db, settings)
