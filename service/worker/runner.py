"""The child process that runs one build: ``python -m service.worker.runner`` (JSON on stdin).

A build runs in its own process group so a cancel or a timeout can kill it, and whatever it
started, without touching the worker; and it dies with its worker (``PR_SET_PDEATHSIG`` on Linux,
plus a watchdog thread), so a worker killed with ``kill -9`` leaves no build running on its own.

A build runs under a memory limit (``RLIMIT_DATA`` from ``build_memory_bytes``, set before
anything heavy is imported): an allocation over it fails inside the build (``MemoryError``, or an
allocation error of ONNX Runtime or TensorRT), and the build fails with ``resource_limit`` naming
the setting, instead of the machine running out of memory under the worker.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from service.settings import Settings
from service.worker.limits import (
    RESOURCE_LIMIT,
    allocation_failed,
    memory_limit_bytes,
    resource_limit_failure,
)
from service.worker.remote_client import RemoteAccess

if TYPE_CHECKING:
    from service.db import Database

__all__ = ["RemoteAccess", "RunnerInput", "limit_memory", "main", "memory_limit_bytes"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class RunnerInput(BaseModel):
    """What the worker sends on the child's stdin."""

    model_config = ConfigDict(frozen=True)

    build_id: str
    attempt: int
    settings: dict[str, object]
    parent_pid: int
    gpu_index: int | None = None
    remote: RemoteAccess | None = None
    """Set for a worker on another machine: the build reads and records through the API
    (:mod:`service.worker.remote_build`) instead of the database."""


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog below still notices

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(70)
            time.sleep(0.5)

    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(70)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def limit_memory(limit: int | None) -> None:
    """Cap this process's data memory (``RLIMIT_DATA``: heap and private writable mappings, so
    a GPU driver's reserved address space does not count) at ``limit`` bytes."""
    if limit is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


class _Cancelled(BaseException):
    """Raised by SIGTERM in the main thread. A BaseException (as KeyboardInterrupt is), so no
    ``except Exception`` on the way up turns a cancel into a failure."""


def _cancel_on_sigterm() -> None:
    """The worker cancels a build with SIGTERM to its group: stop where the build is (the next
    Python instruction of the main thread), record it cancelled; SIGKILL follows after
    ``cancel_grace_s`` if a long native call does not return."""

    def on_term(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup must not be interrupted
        raise _Cancelled

    signal.signal(signal.SIGTERM, on_term)


def main() -> int:
    """Run the build named on stdin; the outcome is recorded in the database."""
    payload = RunnerInput.model_validate_json(sys.stdin.read())
    _die_with_parent(payload.parent_pid)
    _cancel_on_sigterm()
    if payload.gpu_index is not None:  # before anything initializes CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = str(payload.gpu_index)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    settings = Settings.model_validate(payload.settings)
    limit = memory_limit_bytes(settings)
    limit_memory(limit)  # before the heavy imports below
    if payload.remote is not None:
        from service.worker.remote_build import run_remote_build

        outcome = run_remote_build(
            payload.build_id, payload.attempt, payload.remote, settings, limit, _Cancelled
        )
        print(json.dumps({"build_id": payload.build_id, "status": outcome}), flush=True)
        return 0
    from service.db import Database
    from service.store.storage import Storage
    from service.worker.pipeline import run_build

    db = Database.from_settings(settings)
    storage = Storage(settings.data_dir)
    status: str | None = None
    try:
        try:
            status = run_build(
                payload.build_id,
                db=db,
                storage=storage,
                settings=settings,
                attempt=payload.attempt,
            ).value
        except MemoryError:  # raised outside the pipeline's own handling: recorded below
            status = None
        except _Cancelled:
            from service.worker.recorder import BuildRecorder

            BuildRecorder(db, payload.build_id).cancelled()
            status = "cancelled"
        # out of the except block: the frames holding what was allocated are gone now
        if status is None or status == "failed":
            status = _classify_memory_failure(db, payload.build_id, limit) or status or "failed"
    finally:
        storage.remove_own_tmp()
        db.dispose()
    print(json.dumps({"build_id": payload.build_id, "status": status}), flush=True)
    return 0


def _classify_memory_failure(db: Database, build_id: str, limit: int | None) -> str | None:
    """Record a build that failed for want of memory as ``resource_limit`` (with the setting in
    the hint); its status ("failed") when it did, None when it failed for another reason."""
    from service.db.models import BuildRow, utcnow
    from service.schemas import BuildStatus
    from service.worker.recorder import add_log

    with db.session() as session:
        row = session.get(BuildRow, build_id)
        if row is None:
            return None
        ended = BuildStatus(row.status).terminal
        text = f"{row.error_message or ''} {row.error_code or ''}"
        if ended and (row.status != BuildStatus.FAILED.value or not allocation_failed(text)):
            return None
        if row.error_code == RESOURCE_LIMIT:
            return row.status
        reason = (row.error_message or "an allocation failed").removeprefix("The build crashed: ")
        row.status, row.stage, row.finished_at = BuildStatus.FAILED.value, None, utcnow()
        row.error_code, row.error_message, row.error_hint = resource_limit_failure(reason, limit)
        add_log(session, build_id, f"Build failed: {row.error_message}", level="error")
        session.commit()
        log.error("build %s ran out of memory under its limit (%s)", build_id, limit)
        return row.status


if __name__ == "__main__":
    raise SystemExit(main())
