"""``/v1/calibration-tables``: list (by model), get (metadata, TensorRT cache text or JSON),
import a TensorRT cache for a model (checked against the model's tensors)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from calibrators.errors import TableError
from calibrators.table import trt_version_number
from service.api.auth import Principal
from service.api.deps import AppState, BuildAccess, Paging, ReadAccess, SessionDep, StateDep
from service.api.projects import ProjectQuery
from service.api.uploads import ReceivedUpload, multipart_openapi, receive_upload
from service.errors import UploadError
from service.schemas import TablePage, TablePublic
from service.store import catalog

__all__ = ["router"]

router = APIRouter(prefix="/v1/calibration-tables", tags=["calibration tables"])

_MAX_TABLE_BYTES = 64 << 20


@router.get("", operation_id="list_calibration_tables", response_model=TablePage)
def list_calibration_tables(
    session: SessionDep,
    paging: Paging,
    caller: ReadAccess,
    model_id: Annotated[str | None, Query()] = None,
    project: ProjectQuery = None,
) -> TablePage:
    page = catalog.list_tables(
        session, paging.limit, paging.offset, model_id, caller.listing(project)
    )
    return TablePage(
        items=[catalog.table_public(r) for r in page.items],
        total=page.total,
        limit=paging.limit,
        offset=paging.offset,
    )


@router.get(
    "/{table_id}",
    operation_id="get_calibration_table",
    response_model=TablePublic,
    responses={200: {"content": {"text/plain": {}, "application/json": {}}}},
    summary="The table's metadata, or the table itself with ?format=trt (cache text) or json",
)
def get_calibration_table(
    table_id: str,
    state: StateDep,
    session: SessionDep,
    caller: ReadAccess,
    format: Annotated[Literal["trt", "json"] | None, Query()] = None,
    trt_version: Annotated[
        str | None, Query(description="TensorRT version for the cache header, e.g. 10.13.3.")
    ] = None,
) -> Response | TablePublic:
    row = catalog.get_table(session, table_id, field="table_id", project=caller.visible)
    if format is None:
        return catalog.table_public(row)
    table = catalog.load_table(state.storage, row)
    if format == "json":
        return Response(table.to_json(), media_type="application/json")
    return PlainTextResponse(
        table.to_cache_text(_version(trt_version)),
        headers={"Content-Disposition": f'attachment; filename="{row.id[:12]}.cache"'},
    )


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text) if text.isdigit() else trt_version_number(text)
    except ValueError as exc:
        raise TableError(
            f"trt_version {text!r} is not a TensorRT version.",
            hint="Use e.g. 10.13.3 or 101303.",
            field="trt_version",
        ) from exc


def _import(
    state: AppState, upload: ReceivedUpload, caller: Principal
) -> tuple[TablePublic, bool]:
    model_id = upload.fields.get("model_id")
    if not model_id:
        raise UploadError("The form needs a model_id field.", field="model_id")
    try:
        text = upload.file.path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise TableError(
            f"{upload.filename} is not UTF-8 text.",
            hint="Upload a TensorRT calibration cache or a trtforge JSON table.",
            field="file",
        ) from exc
    ignore = upload.fields.get("ignore_unknown", "").lower() in ("1", "true", "yes")
    with state.db.session() as session:
        row, created = catalog.import_table(
            session,
            state.storage,
            model_id,
            text,
            ignore_unknown=ignore,
            project=caller.visible,  # the table joins its model's project
        )
        return catalog.table_public(row), created


@router.post(
    "",
    operation_id="import_calibration_table",
    status_code=201,
    response_model=TablePublic,
    responses={200: {"model": TablePublic, "description": "The same table was imported before."}},
    openapi_extra=multipart_openapi(
        {
            "model_id": "The model the table is for (required).",
            "ignore_unknown": "true: drop tensors the model does not have instead of refusing.",
        }
    ),
)
async def import_calibration_table(
    request: Request, response: Response, state: StateDep, caller: BuildAccess
) -> TablePublic:
    limit = min(_MAX_TABLE_BYTES, state.settings.max_upload_bytes)
    upload = await receive_upload(request, state.storage, limit)
    with upload.file:
        table, created = await run_in_threadpool(_import, state, upload, caller)
    state.counters.uploaded("table", upload.file.size_bytes)
    response.status_code = 201 if created else 200
    response.headers["Location"] = table.links["self"]
    return table
