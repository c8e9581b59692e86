"""``/v1/datasets``: upload (optionally validated against a model), list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from calibrators.errors import DatasetError
from calibrators.spec import PreprocessSpec
from service.api.deps import AppState, BuildAccess, Paging, ReadAccess, SessionDep, StateDep
from service.api.limits import archive_limits
from service.api.naming import NAME_FIELDS, NameQuery, TagQuery
from service.api.projects import ProjectQuery
from service.api.uploads import ReceivedUpload, multipart_openapi, receive_upload
from service.schemas import CatalogPatch, DatasetPage, DatasetPublic
from service.store import catalog
from service.store.naming import apply_patch, form_name_tags, set_name_tags

__all__ = ["router"]

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_FIELDS = {
    "model_id": "Validate the samples against this model's inputs.",
    "preprocess": "JSON preprocessing spec, for a .zip of JPEG/PNG images.",
    "input_name": "Model input a lone .npy or an image zip feeds.",
}


def _preprocess(text: str | None) -> PreprocessSpec | None:
    if text is None or not text.strip():
        return None
    try:
        return PreprocessSpec.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "preprocess"
        raise DatasetError(
            f"The preprocessing spec is invalid at {where}: {first['msg']}.",
            hint='Send JSON like {"resize_shorter": 256, "center_crop": 224, '
            '"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}.',
            field="preprocess",
        ) from exc


def _store(state: AppState, upload: ReceivedUpload, project: str) -> tuple[DatasetPublic, bool]:
    fields = upload.fields
    name, tags = form_name_tags(fields)  # refused before anything is stored
    with state.db.session() as session:
        row, created = catalog.add_dataset(
            session,
            state.storage,
            upload.file,
            upload.filename,
            preprocess=_preprocess(fields.get("preprocess")),
            input_name=fields.get("input_name") or None,
            model_id=fields.get("model_id") or None,
            limits=archive_limits(state.settings),
            project=project,
        )
        if set_name_tags(row, name, tags):
            session.commit()
        return catalog.dataset_public(row), created


@router.post(
    "",
    operation_id="upload_dataset",
    status_code=201,
    response_model=DatasetPublic,
    responses={
        200: {"model": DatasetPublic, "description": "The same dataset was uploaded before."}
    },
    openapi_extra=multipart_openapi(_FIELDS | NAME_FIELDS),
    summary="Upload a calibration dataset (.npz, .npy, .zip of shards or of images)",
)
async def upload_dataset(
    request: Request,
    response: Response,
    state: StateDep,
    caller: BuildAccess,
    project: ProjectQuery = None,
) -> DatasetPublic:
    home = caller.home(project)  # refused before the body is read
    upload = await receive_upload(request, state.storage, state.settings.max_upload_bytes)
    with upload.file:
        dataset, created = await run_in_threadpool(_store, state, upload, home)
    state.counters.uploaded("dataset", upload.file.size_bytes)
    response.status_code = 201 if created else 200
    response.headers["Location"] = dataset.links["self"]
    return dataset


@router.get("", operation_id="list_datasets", response_model=DatasetPage)
def list_datasets(
    session: SessionDep,
    paging: Paging,
    caller: ReadAccess,
    model_id: Annotated[
        str | None, Query(description="Only datasets validated against it.")
    ] = None,
    project: ProjectQuery = None,
    name: NameQuery = None,
    tag: TagQuery = None,
) -> DatasetPage:
    page = catalog.list_datasets(
        session,
        paging.limit,
        paging.offset,
        model_id,
        caller.listing(project),
        name=name,
        tags=tag or (),
    )
    return DatasetPage(
        items=[catalog.dataset_public(r) for r in page.items],
        total=page.total,
        limit=paging.limit,
        offset=paging.offset,
    )


@router.get("/{dataset_id}", operation_id="get_dataset", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, caller: ReadAccess) -> DatasetPublic:
    return catalog.dataset_public(
        catalog.get_dataset(session, dataset_id, project=caller.visible)
    )


@router.patch("/{dataset_id}", operation_id="update_dataset", response_model=DatasetPublic)
def update_dataset(
    dataset_id: str, body: CatalogPatch, session: SessionDep, caller: BuildAccess
) -> DatasetPublic:
    """Set or clear the dataset's name and tags (fields left out stay as they are)."""
    row = catalog.get_dataset(session, dataset_id, project=caller.visible)
    apply_patch(row, body)
    session.commit()
    return catalog.dataset_public(row)


@router.delete("/{dataset_id}", operation_id="delete_dataset", status_code=204)
def delete_dataset(
    dataset_id: str, state: StateDep, session: SessionDep, caller: BuildAccess
) -> Response:
    catalog.delete_dataset(session, state.storage, dataset_id, caller.visible)
    return Response(status_code=204)
