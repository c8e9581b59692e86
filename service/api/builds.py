"""``/v1/builds``: submit (202, or 200 for an identical request), list, status, events, logs,
cancel, delete."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import AppState, BuildAccess, Paging, ReadAccess, SessionDep, StateDep
from service.schemas import BuildCreate, BuildPage, BuildPublic, BuildStatus, LogLine
from service.store import builds

__all__ = ["router"]

router = APIRouter(prefix="/v1/builds", tags=["builds"])

_KEEPALIVE_S = 15.0


@router.post(
    "",
    operation_id="create_build",
    status_code=202,
    response_model=BuildPublic,
    responses={200: {"model": BuildPublic, "description": "An identical build exists."}},
)
def create_build(
    body: BuildCreate, response: Response, state: StateDep, session: SessionDep, _: BuildAccess
) -> BuildPublic:
    row, created = builds.submit_build(session, state.storage, state.queue, body)
    public = builds.build_public(row)
    response.status_code = 202 if created else 200
    response.headers["Location"] = public.links["self"]
    return public


@router.get("", operation_id="list_builds", response_model=BuildPage)
def list_builds(
    session: SessionDep,
    paging: Paging,
    _: ReadAccess,
    model_id: Annotated[str | None, Query()] = None,
    status: Annotated[BuildStatus | None, Query()] = None,
) -> BuildPage:
    page = builds.list_builds(
        session, paging.limit, paging.offset, model_id=model_id, status=status
    )
    return BuildPage(
        items=[builds.build_public(r) for r in page.items],
        total=page.total,
        limit=paging.limit,
        offset=paging.offset,
    )


@router.get("/{build_id}", operation_id="get_build", response_model=BuildPublic)
def get_build(build_id: str, session: SessionDep, _: ReadAccess) -> BuildPublic:
    return builds.build_public(builds.get_build(session, build_id))


@router.get("/{build_id}/logs", operation_id="get_build_logs", response_model=list[LogLine])
def get_build_logs(
    build_id: str,
    session: SessionDep,
    _: ReadAccess,
    after: Annotated[int, Query(ge=0, le=1 << 62, description="Only lines with a larger seq.")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[LogLine]:
    builds.get_build(session, build_id)
    return builds.log_lines(session, build_id, after, limit)


@router.post("/{build_id}/cancel", operation_id="cancel_build", status_code=202)
def cancel_build(build_id: str, session: SessionDep, _: BuildAccess) -> BuildPublic:
    return builds.build_public(builds.cancel_build(session, build_id))


@router.delete("/{build_id}", operation_id="delete_build", status_code=204)
def delete_build(build_id: str, state: StateDep, session: SessionDep, _: BuildAccess) -> Response:
    builds.delete_build(session, state.storage, build_id)
    return Response(status_code=204)


def _snapshot(state: AppState, build_id: str, after: int) -> tuple[BuildPublic, list[LogLine]]:
    with state.db.session() as session:
        build = builds.build_public(builds.get_build(session, build_id))
        return build, builds.log_lines(session, build_id, after)


def _exists(state: AppState, build_id: str) -> None:
    with state.db.session() as session:
        builds.get_build(session, build_id)


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
    _: ReadAccess,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    await run_in_threadpool(_exists, state, build_id)  # 404 before the stream starts
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return StreamingResponse(
        _events(state, request, build_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
