"""The one place errors become HTTP responses: ``{"error": {"code", "message", "hint"}}``.

trtforge errors map by class (most specific first); request validation errors answer 422 naming
the field; unknown routes and methods keep their status with the same envelope; a full disk (of
the data directory or the database) answers 507 ``insufficient_storage`` whichever error it
surfaced as; a database constraint that a concurrent change broke answers 409 ``conflict``;
anything else is a 500 whose details stay in the server log. Messages never carry the server's
own paths: a path under the data directory, the temporary directory, the home or working
directory or the Python installation is cut to its last component (the name the client knows,
e.g. ``w.bin``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from calibrators.errors import CalibrationError
from core.errors import ModelError, TensorRTUnavailableError, TrtforgeError
from engines.errors import EngineError, GraphError, SpecError
from service.errors import (
    AuthenticationError,
    ConflictError,
    HostNotAllowedError,
    InsufficientStorageError,
    LimitExceededError,
    NoTargetError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RangeNotSatisfiableError,
    SettingsError,
    StorageError,
    UnavailableError,
    UploadError,
    scrub_paths,
)
from service.hints import rest_hint
from service.store.storage import is_disk_full

__all__ = [
    "STATUS_BY_ERROR",
    "error_response",
    "install_error_handlers",
    "response_for_error",
    "scrub_paths",
    "status_for",
]

log = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[TrtforgeError], int], ...] = (
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (PayloadTooLargeError, 413),
    (RangeNotSatisfiableError, 416),
    (UploadError, 400),
    (HostNotAllowedError, 421),
    (NoTargetError, 422),
    (LimitExceededError, 422),
    (UnavailableError, 503),
    (StorageError, 507),
    (SettingsError, 500),
    (SpecError, 422),
    (GraphError, 422),
    (EngineError, 422),
    (CalibrationError, 422),
    (ModelError, 422),
    (TensorRTUnavailableError, 422),
    (TrtforgeError, 500),
)
"""Checked in order: the first class the error is an instance of decides."""

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    415: "unsupported_media_type",
}


def status_for(exc: TrtforgeError) -> int:
    """The HTTP status of a trtforge error."""
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(
    status: int,
    code: str,
    message: str,
    hint: str = "",
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, object] = {"code": code, "message": message, "hint": hint}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def response_for_error(exc: TrtforgeError, data_dir: Path | None = None) -> JSONResponse:
    """The response for a trtforge error, its message and hint free of server paths."""
    headers: dict[str, str] = {}
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RangeNotSatisfiableError):
        headers["Content-Range"] = f"bytes */{exc.size_bytes}"
    if isinstance(exc, UnavailableError):
        headers["Retry-After"] = "1"  # a busy pool or a missing worker: worth another try soon
    return error_response(
        status_for(exc),
        exc.code,
        scrub_paths(exc.message, data_dir),
        rest_hint(scrub_paths(exc.hint, data_dir)),  # the API's words, not the CLI's options
        exc.field,
        headers or None,
    )


def _data_dir(request: Request) -> Path | None:
    state = getattr(request.app.state, "trtforge", None)
    return state.settings.data_dir if state is not None else None


async def _trtforge_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TrtforgeError)
    if not isinstance(exc, InsufficientStorageError) and is_disk_full(exc):
        return _disk_full(request, exc)  # e.g. an archive that could not be extracted
    if status_for(exc) >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return response_for_error(exc, _data_dir(request))


def _field_name(loc: Sequence[object]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = _field_name(first.get("loc", ()))
    details = "; ".join(f"{_field_name(e.get('loc', ()))}: {e.get('msg', '')}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return error_response(
        422,
        "request_invalid",
        f"Invalid request: {details}{more}.",
        "See the request schema at /docs (OpenAPI: /openapi.json).",
        field,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, "http_error")
    message = str(exc.detail) if exc.detail else "HTTP error"
    hint = "See the API at /docs." if status in (404, 405) else ""
    if status == 404 and message == "Not Found":
        message = f"No route {request.url.path!r}."
    return error_response(status, code, message, hint, headers=dict(exc.headers or {}) or None)


def _disk_full(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
    error = InsufficientStorageError()
    return error_response(507, error.code, error.message, error.hint)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    if is_disk_full(exc):
        return _disk_full(request, exc)
    if isinstance(exc, IntegrityError):  # a row it refers to was deleted or added meanwhile
        log.warning("%s %s: %s", request.method, request.url.path, exc.orig)
        return error_response(
            409,
            ConflictError.code,
            "The request conflicts with a change made at the same time.",
            "Check that what it refers to still exists, then retry.",
        )
    log.error("%s %s crashed", request.method, request.url.path, exc_info=exc)
    return error_response(
        500,
        "internal_error",
        "The server failed to handle the request.",
        "This is a trtforge bug; the server log has the details.",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(TrtforgeError, _trtforge_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
