"""``?project=``: which project a listing shows or an upload goes to. Only admin tokens name
another project than their own (:class:`service.api.auth.Principal`); everyone else leaves it
out (it defaults to the token's project)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from service.projects import PROJECT_PATTERN

__all__ = ["ProjectQuery"]

ProjectQuery = Annotated[
    str | None,
    Query(
        pattern=PROJECT_PATTERN,
        max_length=63,
        description="Admin tokens: the project to list or upload to (listings: all projects "
        "when left out). Other tokens: their own project only (the default).",
    ),
]
