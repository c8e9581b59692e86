"""Typed dependencies: the app's state, a database session, the caller's access, pagination."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.auth import (
    ANONYMOUS,
    SESSION_COOKIE,
    Principal,
    authenticate_request,
    session_secret,
)
from service.api.metrics import Counters
from service.db import Database
from service.queue.base import JobQueue
from service.schemas import Scope
from service.settings import Settings
from service.store.storage import Storage
from service.worker.slots import Worker

__all__ = [
    "TOKEN_COOKIE",
    "AdminAccess",
    "AppState",
    "BuildAccess",
    "PageParams",
    "Paging",
    "ReadAccess",
    "SessionDep",
    "StateDep",
    "WorkerAccess",
    "get_state",
]

TOKEN_COOKIE = SESSION_COOKIE
"""The dashboard keeps a signed session here (never the token); honoured for GET requests only."""


@dataclass
class AppState:
    """What the app holds for its lifetime (built by ``create_app``)."""

    settings: Settings
    db: Database
    storage: Storage
    queue: JobQueue
    counters: Counters
    worker: Worker | None = None
    worker_db: Database | None = None
    """The in-process worker's own small pool (:meth:`Database.for_worker`)."""


# Dependencies that do no blocking work are ``async``: FastAPI runs a plain ``def`` dependency
# in the threadpool, one thread hop per dependency per request, which under load costs more
# than the work (issue 11, defect 3).


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.trtforge
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _session(state: StateDep) -> Iterator[Session]:
    with state.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(_session, scope="function")]
"""A session around the endpoint function and its response serialization, closed before the
response is sent. Read paths that are polled (builds, reports, logs) open ``state.db.session()``
around their queries instead and serialize after it closes: a connection held while its request
waits for a thread to serialize in can starve the pool (issue 11, defect 3)."""


def _require(scope: Scope) -> Callable[[Request, AppState], Awaitable[Principal]]:
    async def check(request: Request, state: StateDep) -> Principal:
        safe = request.method in ("GET", "HEAD")
        authorization = request.headers.get("authorization")
        cookie = request.cookies.get(TOKEN_COOKIE) if safe else None
        if not authorization and not cookie and not state.settings.auth_required:
            return ANONYMOUS  # nothing to look up: no thread, no database

        def lookup() -> Principal:
            with state.db.session() as session:
                return authenticate_request(
                    session,
                    authorization=authorization,
                    session_cookie=cookie,
                    secret=session_secret(state.settings.data_dir),
                    needed=scope,
                    required=state.settings.auth_required,
                )

        return await run_in_threadpool(lookup)

    return check


ReadAccess = Annotated[Principal, Depends(_require(Scope.READ))]
BuildAccess = Annotated[Principal, Depends(_require(Scope.BUILD))]
AdminAccess = Annotated[Principal, Depends(_require(Scope.ADMIN))]
WorkerAccess = Annotated[Principal, Depends(_require(Scope.WORKER))]
"""A build worker on another machine (``/v1/worker/...``): a ``worker`` or ``admin`` token."""


MAX_OFFSET = 1 << 31
"""Largest pagination offset (bigger ones answer 422, not an integer overflow in the database)."""


@dataclass(frozen=True)
class PageParams:
    limit: int
    offset: int


async def _paging(
    limit: Annotated[int, Query(ge=1, le=500, description="Items per page.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")] = 0,
) -> PageParams:
    return PageParams(limit=limit, offset=offset)


Paging = Annotated[PageParams, Depends(_paging)]
