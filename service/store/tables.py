"""Calibration tables: a row each, the table itself a content-addressed blob.

A table belongs to its model's project. Its id is its cache key: for a computed table the
workflow's key (which covers the model's per-project identity), for an imported one a digest of
the model's id and the table, so no table is shared across projects (only blob files are, counted
by :mod:`service.store.blobs`).
"""

from __future__ import annotations

import hashlib
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from calibrators.errors import TableError
from calibrators.table import CalibrationTable
from service.db.models import ModelRow, TableRow
from service.errors import NotFoundError
from service.projects import DEFAULT_PROJECT
from service.schemas import TablePublic
from service.store.blobs import commit_and_release, place_blob
from service.store.rows import Page, commit_new, newest_first, visible
from service.store.storage import Storage

__all__ = [
    "get_table",
    "import_table_for",
    "list_tables",
    "load_table",
    "store_table",
    "table_public",
]


def table_public(row: TableRow) -> TablePublic:
    source: Literal["calibrated", "imported"] = (
        "imported" if row.source == "imported" else "calibrated"
    )
    return TablePublic(
        id=row.id,
        model_id=row.model_id,
        dataset_id=row.dataset_id,
        source=source,
        method=row.method,
        algorithm=row.algorithm,
        parameters=row.parameters,
        samples=row.samples,
        num_tensors=row.num_tensors,
        digest=row.digest,
        missing_tensors=list(row.missing_tensors),
        created_at=row.created_at,
        project=row.project,
        links={
            "self": f"/v1/calibration-tables/{row.id}",
            "trt": f"/v1/calibration-tables/{row.id}?format=trt",
            "json": f"/v1/calibration-tables/{row.id}?format=json",
        },
    )


def get_table(
    session: Session, table_id: str, *, field: str = "table_id", project: str | None = None
) -> TableRow:
    row = visible(session.get(TableRow, table_id), project)
    if row is None:
        raise NotFoundError(
            f"No calibration table with id {table_id!r}.",
            hint="List them with GET /v1/calibration-tables?model_id=...",
            field=field,
        )
    return row


def load_table(storage: Storage, row: TableRow) -> CalibrationTable:
    """The stored calibration table."""
    return CalibrationTable.from_json(storage.blob_path(row.blob_sha256).read_text("utf-8"))


def list_tables(
    session: Session,
    limit: int,
    offset: int,
    model_id: str | None = None,
    project: str | None = None,
) -> Page[TableRow]:
    query = select(TableRow)
    if project is not None:
        query = query.where(TableRow.project == project)
    if model_id is not None:
        query = query.where(TableRow.model_id == model_id)
    return newest_first(session, query, TableRow, limit, offset)


def import_table_for(
    session: Session, storage: Storage, model: ModelRow, text: str, *, ignore_unknown: bool
) -> tuple[TableRow, bool]:
    """Import a TensorRT cache (or trtforge JSON table) for ``model``, checked against its
    tensors (:func:`service.store.catalog.import_table` finds the model by id)."""
    stripped = text.lstrip()
    table = (
        CalibrationTable.from_json(text)
        if stripped.startswith("{")
        else CalibrationTable.from_cache_text(text)
    )
    match = table.compare_with_model(model.tensor_names)
    if match.unknown_tensors and not ignore_unknown:
        shown = ", ".join(repr(n) for n in match.unknown_tensors[:5])
        more = len(match.unknown_tensors) - 5
        raise TableError(
            f"The table has ranges for {len(match.unknown_tensors)} tensor(s) the model does not "
            f"have: {shown}{f' and {more} more' if more > 0 else ''}.",
            hint="Import the table written for this model, or send ignore_unknown=true to drop them.",
            field="file",
        )
    if match.matched_tensors == 0:
        raise TableError(
            "No tensor of the table exists in the model.",
            hint="Check that the table was written for this model.",
            field="file",
        )
    known = set(model.tensor_names)
    table = table.model_copy(
        update={
            "amax": {k: v for k, v in table.amax.items() if k in known},
            "model_sha256": model.id,
        }
    )
    key = hashlib.sha256(f"import\n{model.id}\n{table.digest}".encode()).hexdigest()
    return store_table(
        session,
        storage,
        key=key,
        model_id=model.id,
        dataset_id=None,
        table=table,
        source="imported",
        missing=list(match.missing_tensors),
    )


def store_table(
    session: Session,
    storage: Storage,
    *,
    key: str,
    model_id: str,
    dataset_id: str | None,
    table: CalibrationTable,
    source: str,
    missing: list[str],
) -> tuple[TableRow, bool]:
    """Store a table under ``key``; (existing row, False) when the key is taken. It joins its
    model's project; keys cover the model's id, which is per project: no table is shared."""
    existing = session.get(TableRow, key)
    if existing is not None:
        return existing, False
    with storage.pending(suffix=".json") as pending:
        pending.write(table.to_json().encode("utf-8"))
        sha = pending.finish()
        blob = place_blob(session, storage, pending.take(), sha)  # locked until the commit
    model = session.get(ModelRow, model_id)  # None: deleted meanwhile, the insert refuses
    row = TableRow(
        id=key,
        project=model.project if model is not None else DEFAULT_PROJECT,
        model_id=model_id,
        dataset_id=dataset_id,
        source=source,
        method=str(table.method) if table.method is not None else None,
        algorithm=str(table.algorithm),
        parameters=dict(table.parameters),
        samples=table.samples,
        num_tensors=len(table.amax),
        digest=table.digest,
        blob_sha256=blob.sha256,
        missing_tensors=missing,
    )
    return commit_new(
        session, row, TableRow, key, lambda: commit_and_release(session, storage, [blob.sha256])
    )
