"""Query parameters and form fields of names and tags (models and datasets): ``?name=``
(a substring of the name or file name, any case) and ``?tag=`` (repeatable: every tag given)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from service.schemas import MAX_NAME_CHARS, MAX_TAGS

__all__ = ["NAME_FIELDS", "NameQuery", "TagQuery"]

NameQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="Only those whose name or uploaded file name contains this (any case).",
    ),
]
TagQuery = Annotated[
    list[str] | None,
    Query(
        max_length=MAX_TAGS,
        description="Only those carrying this tag (repeatable: every tag given).",
    ),
]
NAME_FIELDS = {
    "name": "A name for it (1 to 200 printable characters; PATCH changes it).",
    "tags": "Comma-separated tags (letters, digits, ._:/=+-; PATCH changes them).",
}
"""Upload form fields every catalog upload takes."""
