"""The child process that runs one build: ``python -m service.worker.runner`` (JSON on stdin).

A build runs in its own process group so a cancel or a timeout can kill it, and whatever it
started, without touching the worker; and it dies with its worker (``PR_SET_PDEATHSIG`` on Linux,
plus a watchdog thread), so a worker killed with ``kill -9`` leaves no build running on its own.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time

from pydantic import BaseModel, ConfigDict

from service.settings import Settings

__all__ = ["RunnerInput", "main"]

_PR_SET_PDEATHSIG = 1


class RunnerInput(BaseModel):
    """What the worker sends on the child's stdin."""

    model_config = ConfigDict(frozen=True)

    build_id: str
    attempt: int
    settings: dict[str, object]
    parent_pid: int
    gpu_index: int | None = None


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


def main() -> int:
    """Run the build named on stdin; the outcome is recorded in the database."""
    payload = RunnerInput.model_validate_json(sys.stdin.read())
    _die_with_parent(payload.parent_pid)
    if payload.gpu_index is not None:  # before anything initializes CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = str(payload.gpu_index)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    settings = Settings.model_validate(payload.settings)
    from service.db import Database
    from service.store.storage import Storage
    from service.worker.pipeline import run_build

    db = Database(settings.resolved_database_url)
    storage = Storage(settings.data_dir)
    try:
        status = run_build(
            payload.build_id, db=db, storage=storage, settings=settings, attempt=payload.attempt
        )
    finally:
        storage.remove_own_tmp()
        db.dispose()
    print(json.dumps({"build_id": payload.build_id, "status": status.value}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
