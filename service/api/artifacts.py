"""``/v1/builds/{id}/artifact``: the built engine, streamed with ETag (its sha256), Content-Length,
single Range requests (206) and a Content-Disposition file name; and its metadata sidecar."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import AppState, ReadAccess, SessionDep, StateDep
from service.errors import NotReadyError, RangeNotSatisfiableError
from service.store import builds

__all__ = ["content_disposition", "parse_range", "router"]

router = APIRouter(prefix="/v1/builds", tags=["artifacts"])

_CHUNK_BYTES = 1 << 20
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
"""``first-last``, ``first-`` or ``-suffix``: ASCII digits only (``int()`` would take ``-5``,
``+5`` or ``1_000``)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte of a single ``bytes=`` range, or None to send the whole file.

    Forms it does not serve (several ranges, other units) and malformed ones (``bytes=--5``,
    ``bytes=+1-2``, ``bytes=5-2``) are ignored, as RFC 9110 (section 14.2) asks; a well-formed
    range starting past the end raises :class:`RangeNotSatisfiableError`.
    """
    if not header:
        return None
    units, _, spec = header.partition("=")
    if units.strip().lower() != "bytes" or "," in spec:
        return None
    match = _RANGE_SPEC.fullmatch(spec.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    shown = header[:80]
    try:  # int() refuses numbers past 4300 digits: such a range is ignored too
        first = int(first_text) if first_text else None
        last = int(last_text) if last_text else None
    except ValueError:
        return None
    if first is None:  # suffix range: the last N bytes
        if last is None:  # "bytes=-"
            return None
        if last == 0 or size == 0:
            raise RangeNotSatisfiableError(size, f"Range {shown!r} asks for no bytes.")
        return max(0, size - last), size - 1
    if last is not None and last < first:
        return None
    if first >= size:
        raise RangeNotSatisfiableError(
            size, f"Range {shown!r} starts at or past the end of the {size}-byte artifact."
        )
    return first, size - 1 if last is None else min(last, size - 1)


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact UTF-8 name (RFC 6266)."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _artifact(state: AppState, build_id: str, project: str | None) -> tuple[Path, str, str]:
    with state.db.session() as session:
        row = builds.get_build(session, build_id, project)
        if not row.artifact_sha256:
            raise NotReadyError(f"Build {build_id[:12]} has no artifact (status {row.status}).")
        path = state.storage.blob_path(row.artifact_sha256)
        return path, row.artifact_sha256, row.artifact_filename or f"{build_id}.bin"


async def _read(path: Path, first: int, last: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as fh:
        await fh.seek(first)
        remaining = last - first + 1
        while remaining > 0:
            chunk = await fh.read(min(_CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


@router.get(
    "/{build_id}/artifact",
    operation_id="download_artifact",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The artifact."},
        206: {"content": {"application/octet-stream": {}}, "description": "A byte range."},
        304: {"description": "If-None-Match matched the ETag."},
    },
)
async def download_artifact(
    build_id: str,
    state: StateDep,
    caller: ReadAccess,
    range_: Annotated[str | None, Header(alias="range")] = None,
    if_range: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    path, sha256, filename = await run_in_threadpool(_artifact, state, build_id, caller.visible)
    etag = f'"{sha256}"'
    size = (await anyio.Path(path).stat()).st_size
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(filename),
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    byte_range = parse_range(range_, size) if if_range in (None, etag) else None
    first, last = byte_range if byte_range is not None else (0, size - 1)
    headers["Content-Length"] = str(max(0, last - first + 1))
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(
        _read(path, first, last),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )


@router.head(
    "/{build_id}/artifact",
    operation_id="head_artifact",
    responses={
        200: {"description": "The artifact's headers: Content-Length, ETag (sha256), file name."},
        206: {"description": "A byte range's headers."},
        304: {"description": "If-None-Match matched the ETag."},
    },
)
async def head_artifact(
    build_id: str,
    state: StateDep,
    caller: ReadAccess,
    range_: Annotated[str | None, Header(alias="range")] = None,
    if_range: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """What GET would answer (status, size, ETag = sha256, file name), without the bytes."""
    answer = await download_artifact(build_id, state, caller, range_, if_range, if_none_match)
    return Response(status_code=answer.status_code, headers=dict(answer.headers))


@router.get("/{build_id}/artifact/metadata", operation_id="get_artifact_metadata")
def get_artifact_metadata(
    build_id: str, session: SessionDep, caller: ReadAccess
) -> dict[str, Any]:
    """The artifact's metadata sidecar (backend, versions, GPU, profiles, kept nodes, spec)."""
    row = builds.get_build(session, build_id, caller.visible)
    if row.artifact_metadata is None:
        raise NotReadyError(f"Build {build_id[:12]} has no artifact (status {row.status}).")
    return row.artifact_metadata
