"""``/v1/builds``: submit (202, or 200 for an identical request), list, status, events, logs,
cancel, delete."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, joinedload
from starlette.concurrency import run_in_threadpool

from engines.spec import BackendName, Precision
from service.api.caching import json_response, none_match, not_modified, weak_etag
from service.api.deps import AppState, BuildAccess, Paging, ReadAccess, StateDep
from service.api.naming import NameQuery, TagQuery
from service.api.projects import ProjectQuery
from service.db.models import BuildRow
from service.schemas import BuildCreate, BuildPage, BuildPublic, BuildStatus, LogLine
from service.store import builds
from service.store.bounds import check_request_bounds

__all__ = ["load_build", "router", "status_etag"]

router = APIRouter(prefix="/v1/builds", tags=["builds"])

_KEEPALIVE_S = 15.0
_MAX_SEQ = 1 << 62
_LOG_LINES = TypeAdapter(list[LogLine])
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "If-None-Match matched the ETag."}
}
_BUILD_WITH_JOB = (
    select(BuildRow).options(joinedload(BuildRow.job)).where(BuildRow.id == bindparam("build_id"))
)
"""Built once: the status is the most polled read, and ``Session.get`` with the same loader
option (or this statement built per call) costs about 1.5x its CPU (bench/README.md)."""


def load_build(session: Session, build_id: str, project: str | None = None) -> BuildRow:
    """The build with its job, in one query (:class:`NotFoundError` for an unknown id, or one
    of another project than ``project``; None: any)."""
    row = session.execute(_BUILD_WITH_JOB, {"build_id": build_id}).unique().scalar_one_or_none()
    if row is not None and (project is None or row.project == project):
        return row
    return builds.get_build(session, build_id, project)


def status_etag(row: BuildRow) -> str:
    """A weak ETag of a build's status: it changes with every write to the row (``updated_at``)
    and, belt and braces, with the fields a poller watches."""
    return weak_etag(
        row.id,
        row.updated_at.isoformat(),
        row.status,
        row.stage,
        row.progress,
        row.cancel_requested,
        row.report_sha256,
        row.job.attempts if row.job is not None else None,
    )


# Every endpoint opens its database session around its queries and closes it before the
# response is serialized and sent (engine.py's module docstring says why).


@router.post(
    "",
    operation_id="create_build",
    status_code=202,
    response_model=BuildPublic,
    responses={200: {"model": BuildPublic, "description": "An identical build exists."}},
)
def create_build(body: BuildCreate, state: StateDep, caller: BuildAccess) -> Response:
    check_request_bounds(body, state.settings)  # sizes the settings bound: 422 before any work
    with state.db.session() as session:
        row, created = builds.submit_build(
            session, state.storage, state.queue, body, caller.visible
        )
        public = builds.build_public(row)
    return json_response(
        public, status_code=202 if created else 200, headers={"Location": public.links["self"]}
    )


@router.get("", operation_id="list_builds", response_model=BuildPage)
def list_builds(
    state: StateDep,
    paging: Paging,
    caller: ReadAccess,
    model_id: Annotated[str | None, Query()] = None,
    status: Annotated[BuildStatus | None, Query()] = None,
    project: ProjectQuery = None,
    model_name: NameQuery = None,
    model_tag: TagQuery = None,
    precision: Annotated[Precision | None, Query()] = None,
    backend: Annotated[
        BackendName | None, Query(description="The backend built for, or asked for.")
    ] = None,
) -> Response:
    """Builds, newest first, filtered by model (id, or part of its name or file name, and its
    tags), status, precision and backend."""
    with state.db.session() as session:
        page = builds.list_builds(
            session,
            paging.limit,
            paging.offset,
            model_id=model_id,
            status=status,
            project=caller.listing(project),
            model_name=model_name,
            model_tags=model_tag or (),
            precision=precision,
            backend=backend,
        )
        items = [builds.build_public(r) for r in page.items]
    return json_response(
        BuildPage(items=items, total=page.total, limit=paging.limit, offset=paging.offset)
    )


@router.get(
    "/{build_id}", operation_id="get_build", response_model=BuildPublic, responses=_NOT_MODIFIED
)
def get_build(
    build_id: str,
    state: StateDep,
    caller: ReadAccess,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The build's status, with a weak ``ETag``: send it back as ``If-None-Match`` and an
    unchanged build is answered 304 with no body."""
    with state.db.session() as session:
        row = load_build(session, build_id, caller.visible)
        etag = status_etag(row)
        if none_match(if_none_match, etag):
            return not_modified(etag, {"Cache-Control": "no-cache"})
        public = builds.build_public(row)
    return json_response(public, headers={"ETag": etag, "Cache-Control": "no-cache"})


@router.get("/{build_id}/logs", operation_id="get_build_logs", response_model=list[LogLine])
def get_build_logs(
    build_id: str,
    state: StateDep,
    caller: ReadAccess,
    after: Annotated[int, Query(ge=0, le=_MAX_SEQ, description="Only lines with a larger seq.")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    with state.db.session() as session:
        builds.get_build(session, build_id, caller.visible)
        lines = builds.log_lines(session, build_id, after, limit)
    return Response(_LOG_LINES.dump_json(lines), media_type="application/json")


@router.post("/{build_id}/cancel", operation_id="cancel_build", status_code=202)
def cancel_build(build_id: str, state: StateDep, caller: BuildAccess) -> BuildPublic:
    with state.db.session() as session:
        return builds.build_public(
            builds.cancel_build(session, state.queue, build_id, caller.visible)
        )


@router.delete("/{build_id}", operation_id="delete_build", status_code=204)
def delete_build(build_id: str, state: StateDep, caller: BuildAccess) -> Response:
    with state.db.session() as session:
        builds.delete_build(session, state.storage, build_id, caller.visible)
    return Response(status_code=204)


def _snapshot(state: AppState, build_id: str, after: int) -> tuple[BuildPublic, list[LogLine]]:
    with state.db.session() as session:
        build = builds.build_public(load_build(session, build_id))
        return build, builds.log_lines(session, build_id, after)


def _exists(state: AppState, build_id: str, project: str | None) -> None:
    with state.db.session() as session:
        builds.get_build(session, build_id, project)


def _event(kind: str, data: str, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {data}\n\n".encode()


async def _events(
    state: AppState, request: Request, build_id: str, after: int
) -> AsyncIterator[bytes]:
    last: tuple[str, str | None, float] | None = None
    quiet_since = time.monotonic()
    while True:
        build, lines = await run_in_threadpool(_snapshot, state, build_id, after)
        for line in lines:
            after = line.seq
            yield _event("log", line.model_dump_json(), line.seq)
        key = (build.status.value, build.stage.value if build.stage else None, build.progress)
        if key != last:
            last = key
            yield _event("status", build.model_dump_json())
            quiet_since = time.monotonic()
        if build.status.terminal:
            yield _event("end", json.dumps({"id": build.id, "status": build.status.value}))
            return
        if time.monotonic() - quiet_since > _KEEPALIVE_S:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        if await request.is_disconnected():
            return
        await anyio.sleep(state.settings.poll_interval_s)


@router.get(
    "/{build_id}/events",
    operation_id="build_events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}},
    summary="Server-sent events (status, log, end), ending when the build ends",
)
async def build_events(
    build_id: str,
    request: Request,
    state: StateDep,
    caller: ReadAccess,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    # 404 before the stream starts (another project's build too: its project never changes)
    await run_in_threadpool(_exists, state, build_id, caller.visible)
    after = min(int(last_event_id), _MAX_SEQ) if last_event_id and last_event_id.isdigit() else 0
    return StreamingResponse(
        _events(state, request, build_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
