"""``/v1/models``: upload (streamed, hashed, checked with onnx.checker), list, get, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import AppState, BuildAccess, Paging, ReadAccess, SessionDep, StateDep
from service.api.limits import archive_limits
from service.api.naming import NAME_FIELDS, NameQuery, TagQuery
from service.api.projects import ProjectQuery
from service.api.uploads import ReceivedUpload, multipart_openapi, receive_upload
from service.schemas import CatalogPatch, ModelPage, ModelPublic
from service.store import catalog
from service.store.naming import apply_patch, form_name_tags, set_name_tags

__all__ = ["router"]

router = APIRouter(prefix="/v1/models", tags=["models"])


def _store(state: AppState, upload: ReceivedUpload, project: str) -> tuple[ModelPublic, bool]:
    name, tags = form_name_tags(upload.fields)  # refused before anything is stored
    with state.db.session() as session:
        row, created = catalog.add_model(
            session,
            state.storage,
            upload.file,
            upload.filename,
            archive_limits(state.settings),
            project,
        )
        if set_name_tags(row, name, tags):
            session.commit()
        return catalog.model_public(row), created


@router.post(
    "",
    operation_id="upload_model",
    status_code=201,
    response_model=ModelPublic,
    responses={200: {"model": ModelPublic, "description": "The same bytes were uploaded before."}},
    openapi_extra=multipart_openapi(NAME_FIELDS),
    summary="Upload an ONNX model (.onnx, or .zip of the .onnx with its external data)",
)
async def upload_model(
    request: Request,
    response: Response,
    state: StateDep,
    caller: BuildAccess,
    project: ProjectQuery = None,
) -> ModelPublic:
    home = caller.home(project)  # refused before the body is read
    upload = await receive_upload(request, state.storage, state.settings.max_upload_bytes)
    with upload.file:
        model, created = await run_in_threadpool(_store, state, upload, home)
    state.counters.uploaded("model", upload.file.size_bytes)
    response.status_code = 201 if created else 200
    response.headers["Location"] = model.links["self"]
    return model


@router.get("", operation_id="list_models", response_model=ModelPage)
def list_models(
    session: SessionDep,
    paging: Paging,
    caller: ReadAccess,
    project: ProjectQuery = None,
    name: NameQuery = None,
    tag: TagQuery = None,
) -> ModelPage:
    page = catalog.list_models(
        session, paging.limit, paging.offset, caller.listing(project), name=name, tags=tag or ()
    )
    return ModelPage(
        items=[catalog.model_public(r) for r in page.items],
        total=page.total,
        limit=paging.limit,
        offset=paging.offset,
    )


@router.get("/{model_id}", operation_id="get_model", response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, caller: ReadAccess) -> ModelPublic:
    return catalog.model_public(
        catalog.get_model(session, model_id, field="model_id", project=caller.visible)
    )


@router.patch("/{model_id}", operation_id="update_model", response_model=ModelPublic)
def update_model(
    model_id: str, body: CatalogPatch, session: SessionDep, caller: BuildAccess
) -> ModelPublic:
    """Set or clear the model's name and tags (fields left out stay as they are)."""
    row = catalog.get_model(session, model_id, field="model_id", project=caller.visible)
    apply_patch(row, body)
    session.commit()
    return catalog.model_public(row)


@router.delete("/{model_id}", operation_id="delete_model", status_code=204)
def delete_model(
    model_id: str, state: StateDep, session: SessionDep, caller: BuildAccess
) -> Response:
    catalog.delete_model(session, state.storage, model_id, caller.visible)
    return Response(status_code=204)
