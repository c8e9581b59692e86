"""Workers on other machines: ``trtforge worker --api URL [--token T] --data-dir DIR``.

Such a worker shares nothing with the API but HTTP. :class:`RemoteWorker` is the same
:class:`~service.worker.slots.Worker` (slots, child processes, cancel, timeout, shutdown,
heartbeat, rejoin after being declared dead) over :class:`RemoteQueue`, the
:class:`~service.queue.base.JobQueue` protocol spoken through ``/v1/worker/...``: the API runs
every queue operation on whatever queue it has. Its builds' children read their inputs and record
their progress and results through the API as well (:mod:`service.worker.remote_build`).

Before it takes a build (:func:`preflight`), and before every claim and heartbeat, the worker
checks its data directory; a worker that cannot write it, or cannot reach the API, or whose token
lacks the ``worker`` scope takes nothing, says why in its log, and does not count as live in
``/readyz`` and ``GET /v1/workers`` (it is not registered, or its heartbeat goes stale, so the
builds it ran are re-queued by the usual recovery).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from engines.backends.base import BuildTarget
from service.errors import ApiError, ClientError, ServiceError
from service.queue.base import Job, QueuedTarget, Recovered
from service.schemas import (
    BuildStatus,
    ErrorInfo,
    WorkerBuildFinish,
    WorkerClaim,
    WorkerJob,
    WorkerPublic,
    WorkerRegistration,
)
from service.settings import Settings, hostname
from service.store.storage import Storage
from service.worker.input_cache import InputCache
from service.worker.processes import process_tag
from service.worker.remote_client import RemoteAccess, WorkerClient
from service.worker.runner import RunnerInput
from service.worker.slots import Worker

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["RemoteQueue", "RemoteWorker", "preflight", "run_remote_worker"]

log = logging.getLogger(__name__)

_MAX_PREFLIGHT_WAIT_S = 30.0


def preflight(client: WorkerClient, storage: Storage) -> str | None:
    """Why this worker cannot take builds now (None: it can): its data directory is not
    writable, the API does not answer, or the token may not serve builds."""
    try:
        storage.prepare()
        storage.check()
    except ServiceError as exc:
        return f"its data directory {str(storage.root)!r} is unusable: {exc.message}"
    try:
        client.healthz()
        client.recover()  # needs the worker scope: a read or build token is refused here
    except ApiError as exc:
        if exc.status_code in (401, 403):
            return (
                f"the API at {client.server} refuses its token ({exc.message}); create one "
                "with `trtforge tokens create --scope worker` and pass it with --token"
            )
        return f"the API at {client.server} answered an error: {exc.message}"
    except ClientError as exc:
        return exc.message
    return None


class RemoteQueue:
    """:class:`~service.queue.base.JobQueue` through the API (module docstring). Claims and
    heartbeats check the local data directory first: a worker that cannot write it neither takes
    builds nor stays live."""

    def __init__(self, client: WorkerClient, storage: Storage) -> None:
        self._client = client
        self._storage = storage
        self.slot_problem: Callable[[], str | None] = lambda: None
        """Why the worker's slots take no builds (set by :class:`RemoteWorker`)."""

    def problem(self) -> str | None:
        """Why this worker takes no builds now (its heartbeat says it); None: it does."""
        try:
            self._storage.check()
        except ServiceError as exc:
            return f"its data directory is unusable: {exc.message}"[:500]
        slots = self.slot_problem()
        return None if slots is None else slots[:500]

    def enqueue(self, session: Session, build_id: str) -> None:
        raise ServiceError(
            "A worker does not queue builds.", hint="Submit builds with POST /v1/builds."
        )

    def withdraw(self, session: Session, build_id: str) -> None:
        raise ServiceError(
            "A worker does not cancel builds.", hint="Cancel with POST /v1/builds/{id}/cancel."
        )

    def claim(self, worker_id: str, targets: Sequence[BuildTarget]) -> Job | None:
        self._storage.check()
        job = self._client.claim(WorkerClaim(worker_id=worker_id, targets=list(targets)))
        return None if job is None else Job(id=job.id, build_id=job.build_id, attempt=job.attempt)

    def finish(self, job: Job) -> None:
        self._client.finish_job(_wire(job))

    def release(self, job: Job) -> None:
        self._client.release_job(_wire(job))

    def register_worker(
        self,
        worker_id: str,
        slots: int,
        targets: Sequence[BuildTarget],
        labels: Sequence[str] = (),
    ) -> None:
        self._client.register(
            WorkerRegistration(
                id=worker_id,
                slots=slots,
                targets=list(targets),
                labels=list(labels),
                hostname=hostname(),
                pid=os.getpid(),
                process_tag=process_tag(),
            )
        )

    def heartbeat(self, worker_id: str) -> bool:
        return self._client.heartbeat(worker_id, self.problem())

    def unregister_worker(self, worker_id: str) -> None:
        self._client.unregister(worker_id)

    def recover(self) -> Recovered:
        recovered = self._client.recover()
        return Recovered(requeued=tuple(recovered.requeued), failed=tuple(recovered.failed))

    def depth(self) -> int:
        raise ServiceError("A worker does not see the queue's depth.", hint="Read GET /metrics.")

    def depth_by_target(self) -> list[QueuedTarget]:
        raise ServiceError("A worker does not see the queue's depth.", hint="Read GET /metrics.")

    def live_workers(self) -> int:
        return len(self.workers())

    def live_targets(self) -> list[BuildTarget]:
        targets = [target for worker in self.workers() for target in worker.targets]
        return list(dict.fromkeys(targets))

    def workers(self, *, include_stopped: bool = False) -> list[WorkerPublic]:
        return self._client.workers(include_stopped=include_stopped)


def _wire(job: Job) -> WorkerJob:
    return WorkerJob(id=job.id, build_id=job.build_id, attempt=job.attempt)


class RemoteWorker(Worker):
    """A :class:`~service.worker.slots.Worker` that reaches builds only through the API."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        client: WorkerClient,
        *,
        token: str | None,
        slots: list[int | None] | None = None,
    ) -> None:
        queue = RemoteQueue(client, storage)
        super().__init__(settings, None, storage, queue, slots=slots)
        queue.slot_problem = lambda: None if self.healthy else self.health_detail()
        self.client = client
        self._token = token

    def _build_status(self, build_id: str) -> BuildStatus | None:
        state = self.client.build_state(build_id)
        return None if state is None else state.status

    def _cancel_requested(self, build_id: str) -> bool:
        state = self.client.build_state(build_id)
        return bool(state is not None and state.cancel_requested)

    def _runner_input(self, job: Job, gpu: int | None) -> RunnerInput:
        access = RemoteAccess(api_url=self.client.server, token=self._token, worker_id=self.id)
        return super()._runner_input(job, gpu).model_copy(update={"remote": access})

    def _end(
        self,
        build_id: str,
        status: BuildStatus,
        error: tuple[str, str, str] | None,
        line: str,
    ) -> None:
        if status not in (BuildStatus.FAILED, BuildStatus.CANCELLED):
            raise ValueError(f"a worker ends a build failed or cancelled, not {status}")
        finish = WorkerBuildFinish(
            worker_id=self.id,
            status=BuildStatus.FAILED if status is BuildStatus.FAILED else BuildStatus.CANCELLED,
            error=None if error is None else ErrorInfo(code=error[0], message=error[1], hint=error[2]),
        )
        try:
            self.client.finish(build_id, finish)
        except ApiError as exc:
            if exc.status_code not in (404, 409):
                raise
            # deleted, or no longer this worker's (recovery gave it to another): not ours to end
            log.warning("build %s was not ended by worker %s: %s", build_id, self.id, exc.message)


def run_remote_worker(
    settings: Settings, api_url: str, token: str | None, *, echo: Callable[[str], None]
) -> None:
    """``trtforge worker --api``: wait until :func:`preflight` passes (saying why not, again and
    again), then run until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    storage = Storage(settings.data_dir)
    client = WorkerClient(api_url, token)
    delay = 1.0
    try:
        while (problem := preflight(client, storage)) is not None:
            log.error("this worker takes no builds: %s (checking again in %.0f s)", problem, delay)
            time.sleep(delay)
            delay = min(_MAX_PREFLIGHT_WAIT_S, delay * 2)
        storage.remove_stale_tmp()  # of this directory's processes that were killed
        trimmed = InputCache(storage, settings.worker_cache_bytes or None).trim()
        if trimmed.removed:
            log.info(
                "removed %d left-over work folder(s) and cached input(s), %.1f MiB freed",
                len(trimmed.removed),
                trimmed.freed_bytes / 2**20,
            )
        runner = RemoteWorker(settings, storage, client, token=token)
        shown = f", labels: {', '.join(settings.worker_labels)}" if settings.worker_labels else ""
        echo(f"trtforge worker {runner.id} via {client.server}: {len(runner.slots)} slot(s){shown}")
        runner.run_forever()
    finally:
        client.close()
