"""Typed dependencies: the app's state, a database session, the caller's access, pagination."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from service.api.auth import SESSION_COOKIE, Principal, authenticate_request, session_secret
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


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.trtforge
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _session(state: StateDep) -> Iterator[Session]:
    with state.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]


def _require(scope: Scope) -> Callable[[Request, AppState], Principal]:
    def check(request: Request, state: StateDep) -> Principal:
        safe = request.method in ("GET", "HEAD")
        with state.db.session() as session:
            return authenticate_request(
                session,
                authorization=request.headers.get("authorization"),
                session_cookie=request.cookies.get(TOKEN_COOKIE) if safe else None,
                secret=session_secret(state.settings.data_dir),
                needed=scope,
                required=state.settings.auth_required,
            )

    return check


ReadAccess = Annotated[Principal, Depends(_require(Scope.READ))]
BuildAccess = Annotated[Principal, Depends(_require(Scope.BUILD))]
AdminAccess = Annotated[Principal, Depends(_require(Scope.ADMIN))]


MAX_OFFSET = 1 << 31
"""Largest pagination offset (bigger ones answer 422, not an integer overflow in the database)."""


@dataclass(frozen=True)
class PageParams:
    limit: int
    offset: int


def _paging(
    limit: Annotated[int, Query(ge=1, le=500, description="Items per page.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")] = 0,
) -> PageParams:
    return PageParams(limit=limit, offset=offset)


Paging = Annotated[PageParams, Depends(_paging)]
