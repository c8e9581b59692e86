"""HTTP caching for polled resources: entity tags, ``If-None-Match`` and 304.

Pollers send back the ``ETag`` they were given; an unchanged resource is answered
``304 Not Modified`` with no body, which costs the server one small query and the client no
parsing. Comparison is weak (RFC 9110 section 13.1.2: ``If-None-Match`` compares weakly), and
``If-None-Match: *`` matches any current representation, so it is a 304 whenever the resource
exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from fastapi import Response
from pydantic import BaseModel

__all__ = ["json_response", "none_match", "not_modified", "weak_etag"]


def weak_etag(*parts: object) -> str:
    """A weak entity tag naming the state made of ``parts`` (e.g. a row's version fields)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()
    return f'W/"{digest}"'


def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def none_match(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header matches ``etag`` (weakly), so the answer is 304."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = _opaque(etag)
    return any(_opaque(tag) == wanted for tag in if_none_match.split(",") if tag.strip())


def not_modified(etag: str, headers: Mapping[str, str] | None = None) -> Response:
    """``304 Not Modified`` carrying the current ``ETag`` (and ``headers``)."""
    return Response(status_code=304, headers={"ETag": etag, **(headers or {})})


def json_response(
    model: BaseModel, *, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """``model`` as JSON, serialized here: in a sync endpoint's thread, after its database
    session closed (FastAPI would otherwise validate the returned model again, in another
    thread hop)."""
    return Response(
        model.model_dump_json(),
        status_code=status_code,
        media_type="application/json",
        headers=dict(headers or {}),
    )
