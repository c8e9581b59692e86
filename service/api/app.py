"""``create_app(settings)``: the FastAPI application. Nothing is created at import time.

Startup (in the lifespan): prepare the data directory, apply the database migrations, recover
builds whose worker died, remove orphaned files, and start the in-process worker (unless
``workers`` is 0, when ``trtforge worker`` processes do the builds). Shutdown stops the worker,
putting its running builds back in the queue. Blocking request work (sync endpoints, database
queries) runs on ``api_threads`` threads; the database pool is sized by the ``db_*`` settings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import anyio.to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.api import (
    artifacts,
    builds,
    datasets,
    health,
    models,
    reports,
    sensitivity,
    sweeps,
    tables,
    tokens,
    worker_routes,
    workers,
)
from service.api.auth import session_secret
from service.api.deps import AppState
from service.api.errors import install_error_handlers
from service.api.guards import EdgeGuard
from service.api.metrics import Counters
from service.dashboard import routes as dashboard
from service.db import Database
from service.queue import open_queue
from service.settings import Settings
from service.store.cleanup import remove_orphans
from service.store.storage import Storage
from service.worker.slots import Worker, default_slots

__all__ = ["create_app", "shutdown", "startup"]

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return version("trtforge")
    except PackageNotFoundError:
        return "0+unknown"


def startup(state: AppState) -> None:
    """Everything the server does before it accepts requests (module docstring)."""
    state.storage.prepare()
    session_secret(state.settings.data_dir)
    state.db.migrate()
    recovered = state.queue.recover()
    for build_id in (*recovered.requeued, *recovered.failed):
        state.storage.remove_entry(state.storage.work_dir(build_id))
    remove_orphans(state.db, state.storage, state.settings.orphan_grace_s)
    if state.settings.workers != 0:
        slots = default_slots(state.settings)
        state.worker_db = Database.for_worker(state.settings, len(slots))
        queue = open_queue(state.worker_db, state.settings)
        state.worker = Worker(state.settings, state.worker_db, state.storage, queue, slots=slots)
        state.worker.start()


def shutdown(state: AppState) -> None:
    if state.worker is not None:
        state.worker.stop()
        state.worker = None
    if state.worker_db is not None:
        state.worker_db.dispose()
        state.worker_db = None
    state.storage.remove_own_tmp()
    state.db.dispose()


def create_app(settings: Settings) -> FastAPI:
    """The application for ``settings`` (see the module docstring for its lifecycle)."""
    database = Database.from_settings(settings)
    state = AppState(
        settings=settings,
        db=database,
        storage=Storage(settings.data_dir),
        queue=open_queue(database, settings),
        counters=Counters(),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # the default limiter (40 threads) serves run_in_threadpool and every sync endpoint
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        await run_in_threadpool(startup, state)
        log.info(
            "trtforge serving %s (data in %s, auth %s)",
            settings.base_url,
            settings.data_dir,
            "on" if settings.auth_required else "off",
        )
        try:
            yield
        finally:
            await run_in_threadpool(shutdown, state)

    app = FastAPI(
        title="trtforge",
        version=_version(),
        summary="Calibrated INT8/FP16 TensorRT engines from ONNX models.",
        lifespan=lifespan,
    )
    app.state.trtforge = state
    install_error_handlers(app)
    app.add_middleware(EdgeGuard, settings=settings, db=database)
    for router in (
        health.router,
        models.router,
        datasets.router,
        builds.router,
        artifacts.router,
        reports.router,
        sensitivity.router,
        sweeps.router,
        tables.router,
        tokens.router,
        workers.router,
        worker_routes.router,
        dashboard.router,
    ):
        app.include_router(router)
    return app
