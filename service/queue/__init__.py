"""Build jobs: the queue protocol (:mod:`.base`), the database-backed queue that ships as the
default (:mod:`.database`) and which worker may build what (:mod:`.targets`). The worker that
runs claimed jobs is :mod:`service.worker`."""

from __future__ import annotations

from service.queue.base import Job, JobQueue, JobState, QueuedTarget, Recovered
from service.queue.database import DatabaseQueue

__all__ = ["DatabaseQueue", "Job", "JobQueue", "JobState", "QueuedTarget", "Recovered"]
