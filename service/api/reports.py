"""``/v1/builds/{id}/report``: the build report as JSON, or as an HTML page (``?format=html``).

A report is an immutable blob: its ETag is its sha256 (the HTML page's, a weak tag derived from
it), so a poller that sends the tag back as ``If-None-Match`` gets a 304 after one small query.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import HTMLResponse
from sqlalchemy import bindparam, select

from service.api.caching import none_match, not_modified
from service.api.deps import ReadAccess, StateDep
from service.dashboard.render import render_report
from service.db.models import BuildRow
from service.errors import NotReadyError
from service.schemas import BuildReport
from service.store import builds

__all__ = ["router"]

router = APIRouter(prefix="/v1/builds", tags=["reports"])

_REPORT = select(BuildRow.report_sha256, BuildRow.status).where(
    BuildRow.id == bindparam("build_id")
)
_PROJECT_REPORT = _REPORT.where(BuildRow.project == bindparam("project"))


@router.get(
    "/{build_id}/report",
    operation_id="get_report",
    response_model=BuildReport,
    responses={
        200: {"content": {"text/html": {}}},
        304: {"description": "If-None-Match matched the ETag (the report's sha256)."},
    },
)
def get_report(
    build_id: str,
    state: StateDep,
    caller: ReadAccess,
    format: Annotated[Literal["json", "html"], Query()] = "json",
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    with state.db.connection() as conn:  # two columns: no ORM session needed
        if caller.visible is None:
            found = conn.execute(_REPORT, {"build_id": build_id}).one_or_none()
        else:
            params = {"build_id": build_id, "project": caller.visible}
            found = conn.execute(_PROJECT_REPORT, params).one_or_none()
    if found is None:
        with state.db.session() as session:
            builds.get_build(session, build_id, caller.visible)  # raises NotFoundError
    sha256, status = found or (None, None)
    if not sha256:
        raise NotReadyError(f"Build {build_id[:12]} has no report (status {status}).")
    etag = f'"{sha256}"' if format == "json" else f'W/"{sha256}-html"'
    if none_match(if_none_match, etag):
        return not_modified(etag)
    data = state.storage.blob_path(sha256).read_bytes()
    if format == "html":
        return HTMLResponse(render_report(json.loads(data)), headers={"ETag": etag})
    return Response(data, media_type="application/json", headers={"ETag": etag})
