"""Build jobs: the queue protocol (:mod:`.base`), the database-backed queue that ships as the
default (:mod:`.database`), the worker that runs claimed jobs (:mod:`.worker`) and the per-build
child process (:mod:`.runner`)."""

from __future__ import annotations

from service.queue.base import Job, JobQueue, JobState, Recovered
from service.queue.database import DatabaseQueue

__all__ = ["DatabaseQueue", "Job", "JobQueue", "JobState", "Recovered"]
