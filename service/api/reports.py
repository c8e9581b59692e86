"""``/v1/builds/{id}/report``: the build report as JSON, or as an HTML page (``?format=html``)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse

from service.api.deps import ReadAccess, SessionDep, StateDep
from service.dashboard.render import render_report
from service.errors import NotReadyError
from service.schemas import BuildReport
from service.store import builds

__all__ = ["router"]

router = APIRouter(prefix="/v1/builds", tags=["reports"])


@router.get(
    "/{build_id}/report",
    operation_id="get_report",
    response_model=BuildReport,
    responses={200: {"content": {"text/html": {}}}},
)
def get_report(
    build_id: str,
    state: StateDep,
    session: SessionDep,
    _: ReadAccess,
    format: Annotated[Literal["json", "html"], Query()] = "json",
) -> Response:
    row = builds.get_build(session, build_id)
    if not row.report_sha256:
        raise NotReadyError(f"Build {build_id[:12]} has no report (status {row.status}).")
    data = state.storage.blob_path(row.report_sha256).read_bytes()
    if format == "html":
        return HTMLResponse(render_report(json.loads(data)))
    return Response(data, media_type="application/json")
