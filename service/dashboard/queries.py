"""The dashboard's build list: the API's listing plus filters a person types (model file name,
precision, target backend), each build with its model's file name."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.sql.elements import SQLCoreOperations

from service.db.models import BuildRow, ModelRow
from service.schemas import BuildStatus

__all__ = ["BuildFilter", "filtered_builds", "model_filenames", "model_names"]


@dataclass(frozen=True)
class BuildFilter:
    """What the builds page filters by; empty strings mean "any"."""

    model: str = ""
    """Part of the model's file name or of the name its user gave it (case-insensitive)."""
    status: BuildStatus | None = None
    precision: str = ""
    target: str = ""
    """A backend (``tensorrt``, ``onnxruntime``): the one built for, or asked for."""
    project: str | None = None
    """The viewer's project (None: every project, for admins)."""

    @property
    def active(self) -> bool:
        return bool(self.model or self.status or self.precision or self.target)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def filtered_builds(
    session: Session, where: BuildFilter, limit: int, offset: int
) -> tuple[list[tuple[BuildRow, str]], int]:
    """Builds matching ``where``, newest first, each with its model's name (else its file
    name); and the number matching."""
    name = func.coalesce(ModelRow.name, ModelRow.filename)
    query = select(BuildRow, name).join(ModelRow, ModelRow.id == BuildRow.model_id)
    if where.project is not None:
        query = query.where(BuildRow.project == where.project)
    if where.model:
        pattern = _like(where.model)
        query = query.where(
            or_(
                ModelRow.filename.ilike(pattern, escape="\\"),
                ModelRow.name.ilike(pattern, escape="\\"),
            )
        )
    if where.status is not None:
        query = query.where(BuildRow.status == where.status.value)
    if where.precision:
        query = query.where(BuildRow.request["spec"]["precision"].as_string() == where.precision)
    if where.target:
        query = query.where(
            or_(BuildRow.backend == where.target, BuildRow.requested_backend == where.target)
        )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(
        query.options(selectinload(BuildRow.job))
        .order_by(BuildRow.created_at.desc(), BuildRow.id)
        .limit(limit)
        .offset(offset)
    )
    return [(build, filename) for build, filename in rows], total


def model_names(session: Session, model_ids: set[str]) -> dict[str, str]:
    """Model id -> its name (the one its user gave it, else its file name)."""
    return _by_model_id(session, model_ids, func.coalesce(ModelRow.name, ModelRow.filename))


def model_filenames(session: Session, model_ids: set[str]) -> dict[str, str]:
    """Model id -> the file name it was uploaded as (one query)."""
    return _by_model_id(session, model_ids, ModelRow.filename)


def _by_model_id(session: Session, model_ids: set[str], column: SQLCoreOperations[str]) -> dict[str, str]:
    if not model_ids:
        return {}
    rows = session.execute(select(ModelRow.id, column).where(ModelRow.id.in_(model_ids)))
    return {model_id: value for model_id, value in rows}
