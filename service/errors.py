"""The service error tree. HTTP status codes are chosen in ``service/api/errors.py``, not here.

::

    TrtforgeError (calibrators.errors)
    └── ServiceError
        ├── SettingsError          a setting is missing, contradictory or unsafe
        ├── NotFoundError          no model, dataset, build, table or token with that id
        ├── ConflictError          the request conflicts with the current state
        │   ├── InUseError         a model or dataset is still referenced by builds
        │   └── NotReadyError      the build has no artifact or report (yet)
        ├── RangeNotSatisfiableError  a Range request starts past the end of the file
        ├── UploadError            the upload is malformed (not multipart, no file part)
        ├── PayloadTooLargeError   the upload is larger than the server's limit
        ├── LimitExceededError     a size in the request is above a setting's bound
        ├── AuthenticationError    no valid bearer token was given
        ├── PermissionDeniedError  the token lacks the scope the request needs
        │   └── CrossOriginError   another site's page tried to change state (CSRF)
        ├── HostNotAllowedError    the Host header names no name this server answers
        ├── StorageError           the data directory cannot be written or read
        │   └── InsufficientStorageError  the disk (or a quota) is full
        ├── UnavailableError       the server is not ready (database, storage, workers)
        ├── BuildCancelledError    a build was cancelled (raised inside the pipeline)
        └── ClientError            raised by the Python client
            ├── ApiError           the server answered with an error envelope
            ├── WaitTimeoutError   a build did not end within the wait timeout
            └── DownloadError      a download ended short or its sha256 does not match

Each class's docstring is its default message.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from pathlib import Path, PurePosixPath

from core.errors import TrtforgeError

__all__ = [
    "ApiError",
    "AuthenticationError",
    "BuildCancelledError",
    "ClientError",
    "ConflictError",
    "CrossOriginError",
    "DownloadError",
    "HostNotAllowedError",
    "InUseError",
    "InsufficientStorageError",
    "LimitExceededError",
    "NoTargetError",
    "NotFoundError",
    "NotReadyError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RangeNotSatisfiableError",
    "ServiceError",
    "SettingsError",
    "StorageError",
    "UnavailableError",
    "UploadError",
    "WaitTimeoutError",
    "scrub_paths",
]


class ServiceError(TrtforgeError):
    """The trtforge service could not complete the request."""

    code = "service_error"


class SettingsError(ServiceError):
    """A setting is invalid or unsafe."""

    code = "settings_invalid"
    default_hint = "Settings come from TRTFORGE_* environment variables or the command's options."


class NotFoundError(ServiceError):
    """No such resource."""

    code = "not_found"
    default_hint = "List the resources (GET /v1/...) to find a valid id."


class NoTargetError(ServiceError):
    """No live worker builds for the requested target."""

    code = "no_target"
    default_hint = (
        "Ask for a backend a live worker builds for (GET /v1/workers lists them), or start a "
        "worker on a machine that has it (`trtforge worker`)."
    )


class ConflictError(ServiceError):
    """The request conflicts with the current state of the resource."""

    code = "conflict"


class InUseError(ConflictError):
    """The resource is still referenced."""

    code = "in_use"
    default_hint = "Delete the builds that reference it first (DELETE /v1/builds/{id})."


class NotReadyError(ConflictError):
    """The build has not produced this yet."""

    code = "not_ready"
    default_hint = "Wait for the build to succeed (GET /v1/builds/{id}/events), then retry."


class RangeNotSatisfiableError(ServiceError):
    """The requested byte range is outside the file."""

    code = "range_not_satisfiable"
    default_hint = "Ask for a range that starts before the end of the file (see Content-Length)."

    def __init__(self, size_bytes: int, message: str | None = None) -> None:
        super().__init__(message, field="range")
        self.size_bytes = size_bytes


class UploadError(ServiceError):
    """The upload is malformed."""

    code = "upload_invalid"
    default_hint = "Send multipart/form-data with the file in a part named 'file'."


class PayloadTooLargeError(ServiceError):
    """The upload is larger than the server accepts."""

    code = "payload_too_large"
    default_hint = "Raise TRTFORGE_MAX_UPLOAD_BYTES on the server, or upload a smaller file."


class LimitExceededError(ServiceError):
    """A size in the request is above the server's bound."""

    code = "limit_exceeded"
    default_hint = "Ask for less, or raise the setting named in the message."


class AuthenticationError(ServiceError):
    """A valid bearer token is required."""

    code = "unauthenticated"
    default_hint = (
        "Send 'Authorization: Bearer <token>'; an admin creates one with "
        "`trtforge tokens create --scope build --name NAME`."
    )


class PermissionDeniedError(ServiceError):
    """The token does not have the scope this request needs."""

    code = "forbidden"
    default_hint = "Use a token created with a wider --scope (read < build < admin)."


class StorageError(ServiceError):
    """The data directory cannot be used."""

    code = "storage_failed"
    default_hint = "Check that TRTFORGE_DATA_DIR exists, is writable and has free space."


class InsufficientStorageError(StorageError):
    """The server's disk is full."""

    code = "insufficient_storage"
    default_hint = (
        "Nothing was stored; retry later. The server's operator frees space in TRTFORGE_DATA_DIR "
        "(delete unused builds and models) or gives it a larger disk."
    )


class UnavailableError(ServiceError):
    """The service is not ready."""

    code = "unavailable"


class BuildCancelledError(ServiceError):
    """The build was cancelled."""

    code = "cancelled"


class ClientError(ServiceError):
    """The trtforge server could not be reached or answered unexpectedly."""

    code = "client_error"
    default_hint = "Check --server (or TRTFORGE_SERVER) and that `trtforge serve` is running."


class ApiError(ClientError):
    """The server refused the request."""

    code = "api_error"
    default_hint = ""

    def __init__(
        self,
        message: str | None = None,
        *,
        hint: str | None = None,
        field: str | None = None,
        status_code: int = 0,
        remote_code: str = "",
    ) -> None:
        super().__init__(message, hint=hint, field=field)
        self.status_code = status_code
        self.remote_code = remote_code


class WaitTimeoutError(ClientError):
    """The build did not end in time."""

    code = "wait_timeout"
    default_hint = "Wait longer (--timeout), or follow it with `trtforge status ID`."


class DownloadError(ClientError):
    """The download is incomplete or corrupt."""

    code = "download_corrupt"
    default_hint = "Run the download again; it resumes where it stopped."


class CrossOriginError(PermissionDeniedError):
    """A page from another origin may not change state on this server."""

    code = "cross_origin_refused"
    default_hint = (
        "Call the API from the same origin, send an Authorization header, or list the page's "
        "origin in TRTFORGE_CORS_ORIGINS."
    )


class HostNotAllowedError(ServiceError):
    """The Host header names no name this server answers (DNS rebinding protection)."""

    code = "host_not_allowed"
    default_hint = "Use the server's configured name, or add it to TRTFORGE_ALLOWED_HOSTS."


@functools.lru_cache(maxsize=16)
def _path_pattern(data_dir: Path | None) -> re.Pattern[str]:
    roots = {sys.prefix, sys.base_prefix, tempfile.gettempdir(), str(Path.cwd()), str(Path.home())}
    if data_dir is not None:
        roots.add(str(data_dir))
    roots |= {os.path.realpath(root) for root in roots}
    # "/" alone would swallow ONNX node names such as "/model/conv1/Conv"
    usable = sorted((r.rstrip("/") for r in roots if len(PurePosixPath(r).parts) > 1), key=len)
    alternatives = "|".join(re.escape(root) for root in reversed(usable))
    return re.compile(rf"(?<![\w.:/-])(?:{alternatives})(?![^/\s'\"`,;:)\]])[^\s'\"`,;)\]]*")


def _last_component(match: re.Match[str]) -> str:
    path = match.group(0).rstrip("/.")
    tail = match.group(0)[len(path) :].replace("/", "")  # a sentence's full stop stays
    name = PurePosixPath(path).name
    return (name if name and match.group(0).count("/") > 1 else "<server path>") + tail


def scrub_paths(text: str, data_dir: Path | None = None) -> str:
    """``text`` with the server's own paths cut to their last component (module docstring)."""
    if not text or "/" not in text:
        return text
    return _path_pattern(data_dir).sub(_last_component, text)
