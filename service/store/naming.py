"""Names and tags of models and datasets: set at upload (form fields ``name`` and ``tags``),
changed with ``PATCH``, and filtered on in listings (``?name=``, ``?tag=``).

Tags are stored as one text ``,a,b,`` (sorted; none: ``""``), so that "has tag x" is
``LIKE '%,x,%'`` on SQLite and PostgreSQL alike (``_`` in a tag is escaped, not a wildcard).
A name filter matches a substring of the name or of the uploaded file's name, ignoring case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Select, func, or_
from sqlalchemy.orm import InstrumentedAttribute

from service.errors import UploadError
from service.schemas import MAX_TAGS, CatalogPatch, Tag, UserName

__all__ = [
    "apply_patch",
    "filter_named",
    "form_name_tags",
    "tags_list",
    "tags_text",
]

_TAGS = TypeAdapter(list[Tag])
_NAME = TypeAdapter(UserName)
S = TypeVar("S", bound=Select[Any])


class Named(Protocol):
    """A row with a user name and tags (models, datasets)."""

    name: str | None
    tags: str


def tags_text(tags: Sequence[str]) -> str:
    """The stored form of ``tags``: ``,a,b,`` sorted without repeats; ``""`` for none."""
    unique = sorted(set(tags))
    return f",{','.join(unique)}," if unique else ""


def tags_list(text: str | None) -> list[str]:
    """The tags of a stored ``,a,b,`` text."""
    return [t for t in (text or "").split(",") if t]


def form_name_tags(fields: Mapping[str, str]) -> tuple[str | None, list[str] | None]:
    """The ``name`` and ``tags`` (comma-separated) form fields of an upload, validated; None
    for a field not sent. :class:`UploadError` (400) naming the field otherwise."""
    name = tags = None
    text = fields.get("name")
    if text is not None and text.strip():
        try:
            name = _NAME.validate_python(text)
        except ValidationError as exc:
            raise UploadError(
                f"The name field is invalid: {exc.errors()[0]['msg']}.",
                hint="Send 1 to 200 printable characters.",
                field="name",
            ) from exc
    text = fields.get("tags")
    if text is not None:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            tags = sorted(set(_TAGS.validate_python(items)))
        except ValidationError as exc:
            bad = items[int(exc.errors()[0]["loc"][0])] if exc.errors()[0]["loc"] else text
            raise UploadError(
                f"The tag {bad[:70]!r} is invalid.",
                hint="Tags are comma-separated; each a letter or digit, then letters, digits and "
                "._:/=+- (at most 63 characters).",
                field="tags",
            ) from exc
        if len(tags) > MAX_TAGS:
            raise UploadError(
                f"{len(tags)} tags, more than the limit of {MAX_TAGS}.",
                hint=f"Send at most {MAX_TAGS} tags.",
                field="tags",
            )
    return name, tags


def set_name_tags(row: Named, name: str | None, tags: list[str] | None) -> bool:
    """Set what was given (None: left as it is); whether anything changed."""
    before = (row.name, row.tags)
    if name is not None:
        row.name = name
    if tags is not None:
        row.tags = tags_text(tags)
    return (row.name, row.tags) != before


def apply_patch(row: Named, patch: CatalogPatch) -> None:
    """``PATCH`` semantics: fields left out stay; ``name`` null or ``""`` clears it."""
    given = patch.model_fields_set
    if "name" in given:
        row.name = patch.name or None
    if "tags" in given:
        row.tags = tags_text(patch.tags or [])


def filter_named(
    query: S,
    name_column: InstrumentedAttribute[str | None],
    filename_column: InstrumentedAttribute[str],
    tags_column: InstrumentedAttribute[str],
    *,
    name: str | None = None,
    tags: Sequence[str] = (),
) -> S:
    """``query`` restricted to rows whose name or file name contains ``name`` (any case) and
    that carry every tag of ``tags``."""
    if name:
        needle = name.lower()
        query = query.where(
            or_(
                func.lower(name_column).contains(needle, autoescape=True),
                func.lower(filename_column).contains(needle, autoescape=True),
            )
        )
    for tag in tags:
        query = query.where(tags_column.contains(f",{tag},", autoescape=True))
    return query
