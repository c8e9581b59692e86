"""What the stored kinds of rows share: a page of a listing (newest first, with its total), the
project filter of getters, and committing a new catalog row that may race an identical one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import ExecutableOption

from service.db.models import BuildRow, DatasetRow, ModelRow, SweepRow, TableRow
from service.errors import ConflictError
from service.store.storage import Storage

__all__ = ["Page", "commit_new", "newest_first", "undo_publish", "visible"]

T = TypeVar("T")
R = TypeVar("R", ModelRow, DatasetRow, TableRow)
Owned = TypeVar("Owned", ModelRow, DatasetRow, TableRow, BuildRow, SweepRow)
"""A row that belongs to a project."""


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of rows and the total count matching the query."""

    items: list[T]
    total: int


def newest_first(
    session: Session,
    query: Select[Owned],
    kind: type[Owned],
    limit: int,
    offset: int,
    *,
    load: Sequence[ExecutableOption] = (),
) -> Page[Owned]:
    """The page of ``query``'s rows at ``offset``, newest first (ties by id), with the number of
    rows the query matches; ``load``: loader options for the page's rows."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = query.options(*load).order_by(kind.created_at.desc(), kind.id)
    return Page(list(session.scalars(page.limit(limit).offset(offset))), total)


def visible(row: Owned | None, project: str | None) -> Owned | None:
    """``row`` if the caller may see it: it exists and belongs to ``project`` (None: any)."""
    if row is None or (project is not None and row.project != project):
        return None
    return row


def undo_publish(storage: Storage, dest: Path, published: bool) -> Callable[[], None]:
    def undo() -> None:
        if published:
            storage.remove_entry(dest)

    return undo


def commit_new(
    session: Session, row: R, kind: type[R], key: str, undo: Callable[[], object]
) -> tuple[R, bool]:
    """Insert ``row``; on a concurrent insert of the same key return that one instead.

    Any other constraint failure means a row it references (its model, its dataset) was deleted
    meanwhile: :class:`ConflictError`.
    """
    session.add(row)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        winner = session.get(kind, key)
        if winner is None:
            undo()
            raise ConflictError(
                f"The {kind.__tablename__.rstrip('s').replace('_', ' ')} could not be stored: "
                "a model or dataset it refers to was deleted at the same time.",
                hint="Check that the model (and dataset) still exist, then retry.",
            ) from exc
        return winner, False
    except BaseException:
        session.rollback()
        undo()
        raise
    return row, True
