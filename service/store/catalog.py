"""Models, datasets and calibration tables: stored files plus their database rows (the tables'
own functions live in :mod:`service.store.tables` and are re-exported here).

A row is committed only after its files are published, and files are removed if the commit
fails, so bad input never leaves a partial model, dataset or table behind. Same bytes give the
same id within a project: a second upload there returns the existing row. In another project
they are another entry with another id (:func:`service.projects.scoped_id`).

Every getter, listing and deletion takes ``project``: the caller's project, or None for all
(admins, the worker). A row of another project is not found, as an unknown id is not.

Deletions race with submissions: the foreign keys decide. A model deleted while a build (or a
dataset, or a table) referencing it is committed refuses with :class:`InUseError`; a row whose
model or dataset was deleted meanwhile refuses with :class:`ConflictError` (both HTTP 409).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from calibrators.archive import ArchiveLimits
from calibrators.spec import PreprocessSpec
from core.tensors import TensorSpec
from service.db.models import BuildRow, DatasetRow, ModelRow, TableRow
from service.errors import InUseError, NotFoundError
from service.projects import DEFAULT_PROJECT, scoped_id
from service.schemas import (
    DatasetPublic,
    ModelPublic,
    TensorInfo,
)
from service.store.blobs import commit_and_release
from service.store.ingest import dataset_id, stage_dataset, stage_model
from service.store.naming import filter_named, tags_list
from service.store.rows import Page, commit_new, newest_first, undo_publish, visible
from service.store.storage import PendingFile, Storage
from service.store.tables import (
    get_table,
    import_table_for,
    list_tables,
    load_table,
    store_table,
    table_public,
)

__all__ = [
    "Page",
    "add_dataset",
    "add_model",
    "dataset_path",
    "dataset_public",
    "delete_dataset",
    "delete_model",
    "get_dataset",
    "get_model",
    "get_table",
    "import_table",
    "list_datasets",
    "list_models",
    "list_tables",
    "load_table",
    "model_input_specs_of",
    "model_path",
    "model_public",
    "store_table",
    "table_public",
]


# -- models ------------------------------------------------------------------------------------


def model_public(row: ModelRow) -> ModelPublic:
    info = row.info
    return ModelPublic(
        id=row.id,
        filename=row.filename,
        size_bytes=row.size_bytes,
        external_data=row.external_data,
        opset=info.get("opset"),
        ir_version=info.get("ir_version"),
        inputs=[TensorInfo.model_validate(t) for t in info.get("inputs", [])],
        outputs=[TensorInfo.model_validate(t) for t in info.get("outputs", [])],
        dynamic_dims=info.get("dynamic_dims", {}),
        op_census=info.get("op_census", {}),
        num_nodes=info.get("num_nodes", 0),
        name=row.name,
        tags=tags_list(row.tags),
        created_at=row.created_at,
        project=row.project,
        links={"self": f"/v1/models/{row.id}"},
    )


def get_model(
    session: Session, model_id: str, *, field: str = "model_id", project: str | None = None
) -> ModelRow:
    row = visible(session.get(ModelRow, model_id), project)
    if row is None:
        raise NotFoundError(
            f"No model with id {model_id!r}.",
            hint="Upload it with POST /v1/models or list them with GET /v1/models.",
            field=field,
        )
    return row


def model_path(storage: Storage, row: ModelRow) -> Path:
    return storage.model_dir(row.id) / row.onnx_filename


def model_input_specs_of(storage: Storage, row: ModelRow) -> list[TensorSpec]:
    """The model's graph inputs, read from the stored file."""
    from core.onnxio import load_onnx
    from core.tensors import model_input_specs

    return model_input_specs(load_onnx(model_path(storage, row), load_external_data=False))


def add_model(
    session: Session,
    storage: Storage,
    upload: PendingFile,
    filename: str,
    limits: ArchiveLimits,
    project: str = DEFAULT_PROJECT,
) -> tuple[ModelRow, bool]:
    """Store an uploaded model in ``project``; returns (row, created). Raises
    ModelError/ArchiveError."""
    id_ = scoped_id(project, upload.finish())
    existing = session.get(ModelRow, id_)
    if existing is not None:
        return existing, False
    dest = storage.model_dir(id_)
    with storage.staging_dir() as staging:
        received = staging / "upload"
        upload.take().rename(received)
        entry = staging / "entry"
        entry.mkdir()
        staged = stage_model(received, filename, entry, limits)
        published = storage.publish_dir(entry, dest)
    row = ModelRow(
        id=id_,
        project=project,
        filename=Path(filename).name[:255] or "model.onnx",
        onnx_filename=staged.onnx_filename,
        size_bytes=upload.size_bytes,
        external_data=staged.external_data,
        info=staged.info,
        tensor_names=staged.tensor_names,
    )
    return commit_new(session, row, ModelRow, id_, undo_publish(storage, dest, published))


def list_models(
    session: Session,
    limit: int,
    offset: int,
    project: str | None = None,
    *,
    name: str | None = None,
    tags: Sequence[str] = (),
) -> Page[ModelRow]:
    """Models, newest first; ``name`` and ``tags`` filter as :func:`naming.filter_named`."""
    query = select(ModelRow)
    if project is not None:
        query = query.where(ModelRow.project == project)
    query = filter_named(
        query, ModelRow.name, ModelRow.filename, ModelRow.tags, name=name, tags=tags
    )
    return newest_first(session, query, ModelRow, limit, offset)


def delete_model(
    session: Session, storage: Storage, model_id: str, project: str | None = None
) -> None:
    """Delete a model, its calibration tables and files; refused while builds reference it."""
    row = get_model(session, model_id, field="id", project=project)
    builds = session.scalar(select(func.count()).where(BuildRow.model_id == model_id)) or 0
    if builds:
        raise InUseError(f"Model {model_id[:12]} is used by {builds} build(s).")
    tables = list(session.scalars(select(TableRow).where(TableRow.model_id == model_id)))
    blobs = [t.blob_sha256 for t in tables]
    for table in tables:
        session.delete(table)
    session.delete(row)
    try:
        commit_and_release(session, storage, blobs)
    except IntegrityError as exc:  # a build or table referencing it was committed meanwhile
        raise InUseError(
            f"Model {model_id[:12]} was referenced by a build or table submitted while it was "
            "being deleted.",
            hint="Delete the builds that reference it first (GET /v1/builds?model_id=...).",
        ) from exc
    storage.remove_entry(storage.model_dir(model_id))


# -- datasets ----------------------------------------------------------------------------------


def dataset_public(row: DatasetRow) -> DatasetPublic:
    return DatasetPublic(
        id=row.id,
        sha256=row.sha256,
        filename=row.filename,
        format=row.format,
        size_bytes=row.size_bytes,
        num_samples=row.num_samples,
        inputs=[TensorInfo.model_validate(t) for t in row.inputs],
        digest=row.digest,
        preprocess=row.preprocess,
        model_id=row.model_id,
        name=row.name,
        tags=tags_list(row.tags),
        created_at=row.created_at,
        project=row.project,
        links={"self": f"/v1/datasets/{row.id}"},
    )


def get_dataset(
    session: Session, id_: str, *, field: str = "dataset_id", project: str | None = None
) -> DatasetRow:
    row = visible(session.get(DatasetRow, id_), project)
    if row is None:
        raise NotFoundError(
            f"No dataset with id {id_!r}.",
            hint="Upload it with POST /v1/datasets or list them with GET /v1/datasets.",
            field=field,
        )
    return row


def dataset_path(storage: Storage, row: DatasetRow) -> Path:
    return storage.dataset_dir(row.id) / row.data_filename


def add_dataset(
    session: Session,
    storage: Storage,
    upload: PendingFile,
    filename: str,
    *,
    preprocess: PreprocessSpec | None,
    input_name: str | None,
    model_id: str | None,
    limits: ArchiveLimits,
    project: str = DEFAULT_PROJECT,
) -> tuple[DatasetRow, bool]:
    """Store an uploaded dataset in ``project`` (checked against ``model_id``'s inputs when
    given: a model of the same project)."""
    model = get_model(session, model_id, project=project) if model_id is not None else None
    inputs = model_input_specs_of(storage, model) if model is not None else None
    sha = upload.finish()
    id_ = scoped_id(project, dataset_id(sha, preprocess, input_name))
    existing = session.get(DatasetRow, id_)
    if existing is not None:
        if inputs is not None:
            _revalidate(storage, existing, inputs, limits)
        return existing, False
    dest = storage.dataset_dir(id_)
    with storage.staging_dir() as staging:
        received = staging / "upload"
        upload.take().rename(received)
        entry = staging / "entry"
        entry.mkdir()
        staged = stage_dataset(
            received,
            filename,
            entry,
            preprocess=preprocess,
            input_name=input_name,
            limits=limits,
            model_inputs=inputs,
        )
        published = storage.publish_dir(entry, dest)
    row = DatasetRow(
        id=id_,
        project=project,
        sha256=sha,
        filename=Path(filename).name[:255],
        data_filename=staged.data_filename,
        format=staged.format,
        size_bytes=upload.size_bytes,
        num_samples=staged.num_samples,
        inputs=staged.inputs,
        digest=staged.digest,
        preprocess=preprocess.model_dump(mode="json") if preprocess else None,
        input_name=input_name,
        model_id=model_id,
    )
    return commit_new(session, row, DatasetRow, id_, undo_publish(storage, dest, published))


def _revalidate(
    storage: Storage, row: DatasetRow, inputs: list[TensorSpec], limits: ArchiveLimits
) -> None:
    from calibrators.data import CalibrationDataset

    preprocess = PreprocessSpec.model_validate(row.preprocess) if row.preprocess else None
    CalibrationDataset.open(
        dataset_path(storage, row), preprocess=preprocess, limits=limits, input_name=row.input_name
    ).validate(inputs)


def list_datasets(
    session: Session,
    limit: int,
    offset: int,
    model_id: str | None = None,
    project: str | None = None,
    *,
    name: str | None = None,
    tags: Sequence[str] = (),
) -> Page[DatasetRow]:
    """Datasets, newest first; ``name`` and ``tags`` filter as :func:`naming.filter_named`."""
    query = select(DatasetRow)
    if project is not None:
        query = query.where(DatasetRow.project == project)
    query = filter_named(
        query, DatasetRow.name, DatasetRow.filename, DatasetRow.tags, name=name, tags=tags
    )
    if model_id is not None:
        query = query.where(DatasetRow.model_id == model_id)
    return newest_first(session, query, DatasetRow, limit, offset)


def delete_dataset(
    session: Session, storage: Storage, id_: str, project: str | None = None
) -> None:
    """Delete a dataset and its files; refused while builds reference it."""
    row = get_dataset(session, id_, field="id", project=project)
    uses = or_(BuildRow.dataset_id == id_, BuildRow.eval_dataset_id == id_)
    builds = session.scalar(select(func.count()).where(uses)) or 0
    if builds:
        raise InUseError(f"Dataset {id_[:12]} is used by {builds} build(s).")
    session.delete(row)
    try:
        session.commit()
    except IntegrityError as exc:  # a build referencing it was committed meanwhile
        session.rollback()
        raise InUseError(
            f"Dataset {id_[:12]} was referenced by a build submitted while it was being deleted."
        ) from exc
    storage.remove_entry(storage.dataset_dir(id_))


# -- calibration tables (service.store.tables) -------------------------------------------------


def import_table(
    session: Session,
    storage: Storage,
    model_id: str,
    text: str,
    *,
    ignore_unknown: bool,
    project: str | None = None,
) -> tuple[TableRow, bool]:
    """Import a TensorRT cache (or trtforge JSON table) for a model of ``project`` (None: any),
    checked against its tensors."""
    model = get_model(session, model_id, project=project)
    return import_table_for(session, storage, model, text, ignore_unknown=ignore_unknown)
