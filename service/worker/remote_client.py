"""The HTTP client of a worker on another machine: ``/v1/worker/...`` with a ``worker`` token.

Inputs are downloaded to a file and checked against the sha256 the API lists for them before
anything uses them; uploads stream from disk. Every error the API answers is an
:class:`~service.errors.ApiError` (its status code and code kept), transport failures a
:class:`~service.errors.ClientError` that names the API's address.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

from core.hashing import sha256_file
from service.client import TrtforgeClient, _raise_for_error
from service.errors import ApiError, ClientError, DownloadError
from service.schemas import (
    InputFile,
    TablePublic,
    WorkerAlive,
    WorkerBuildFinish,
    WorkerBuildPlan,
    WorkerBuildState,
    WorkerBuildUpdate,
    WorkerCall,
    WorkerClaim,
    WorkerJob,
    WorkerPublic,
    WorkerRecovered,
    WorkerRegistration,
    WorkerTable,
    WorkerTableStore,
)

__all__ = ["RemoteAccess", "WorkerClient"]

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 30.0
"""Per network operation (connect, each read or write), not per request: long transfers go on."""

M = TypeVar("M", bound=BaseModel)


class RemoteAccess(BaseModel):
    """How a build of a worker on another machine reaches the API (sent on the build child's
    stdin only: it holds the token)."""

    model_config = ConfigDict(frozen=True)

    api_url: str
    token: str | None
    worker_id: str


class WorkerClient(TrtforgeClient):
    """``/v1/worker/...`` for one API (``api_url``) and token."""

    def __init__(
        self,
        api_url: str,
        token: str | None,
        *,
        timeout_s: float = _TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(api_url, token, timeout_s=timeout_s, transport=transport)

    # -- the worker's lifecycle --------------------------------------------------------------

    def register(self, registration: WorkerRegistration) -> None:
        self._request("POST", "/v1/worker/register", json=registration.model_dump(mode="json"))

    def heartbeat(self, worker_id: str, problem: str | None = None) -> bool:
        body = WorkerCall(worker_id=worker_id, problem=problem).model_dump(mode="json")
        answer = self._request("POST", "/v1/worker/heartbeat", json=body)
        return WorkerAlive.model_validate_json(answer.content).alive

    def unregister(self, worker_id: str) -> None:
        body = WorkerCall(worker_id=worker_id).model_dump(mode="json")
        self._request("POST", "/v1/worker/unregister", json=body)

    def recover(self) -> WorkerRecovered:
        answer = self._request("POST", "/v1/worker/recover")
        return WorkerRecovered.model_validate_json(answer.content)

    def claim(self, claim: WorkerClaim) -> WorkerJob | None:
        answer = self._request("POST", "/v1/worker/claim", json=claim.model_dump(mode="json"))
        if answer.status_code == 204:
            return None
        return WorkerJob.model_validate_json(answer.content)

    def finish_job(self, job: WorkerJob) -> None:
        self._request("POST", "/v1/worker/jobs/finish", json=job.model_dump(mode="json"))

    def release_job(self, job: WorkerJob) -> None:
        self._request("POST", "/v1/worker/jobs/release", json=job.model_dump(mode="json"))

    def workers(self, *, include_stopped: bool = False) -> list[WorkerPublic]:
        answer = self._request(
            "GET", "/v1/workers", params={"include_stopped": str(include_stopped).lower()}
        )
        return [WorkerPublic.model_validate(item) for item in answer.json()]

    # -- one build ---------------------------------------------------------------------------

    def build_state(self, build_id: str) -> WorkerBuildState | None:
        """The build's state; None when it is gone (deleted)."""
        return self._get_or_none(f"/v1/worker/builds/{build_id}", WorkerBuildState)

    def plan(self, build_id: str) -> WorkerBuildPlan:
        return self._get(f"/v1/worker/builds/{build_id}/plan", WorkerBuildPlan)

    def update(self, build_id: str, update: WorkerBuildUpdate) -> WorkerBuildState:
        body = update.model_dump(mode="json", exclude_unset=True)
        answer = self._request("POST", f"/v1/worker/builds/{build_id}/update", json=body)
        return WorkerBuildState.model_validate_json(answer.content)

    def finish(self, build_id: str, finish: WorkerBuildFinish) -> WorkerBuildState:
        body = finish.model_dump(mode="json")
        answer = self._request("POST", f"/v1/worker/builds/{build_id}/finish", json=body)
        return WorkerBuildState.model_validate_json(answer.content)

    def upload(self, build_id: str, worker_id: str, path: Path) -> str:
        """Stream ``path`` to the API for ``build_id``; the sha256 it stored, checked against
        the file's."""
        with path.open("rb") as fh:
            return self._send_file(build_id, worker_id, path.name, fh, sha256_file(path))

    def upload_bytes(self, build_id: str, worker_id: str, name: str, data: bytes) -> str:
        """:meth:`upload` of bytes in memory."""
        digest = hashlib.sha256(data).hexdigest()
        return self._send_file(build_id, worker_id, name, data, digest)

    def _send_file(
        self, build_id: str, worker_id: str, name: str, body: IO[bytes] | bytes, expected: str
    ) -> str:
        fields = {"build_id": build_id, "worker_id": worker_id, "sha256": expected}
        files = {"file": (name, body, "application/octet-stream")}
        answer = self._request("POST", "/v1/worker/uploads", files=files, data=fields)
        stored = str(answer.json().get("sha256", ""))
        if stored != expected:
            raise DownloadError(
                f"The API stored {name} with sha256 {stored[:12]}, not {expected[:12]}.",
                hint="The upload was corrupted on the way; the build is retried.",
            )
        return stored

    def table(self, key: str) -> WorkerTable | None:
        """The stored table ``key`` (id or cache key); None when there is none."""
        return self._get_or_none(f"/v1/worker/tables/{key}", WorkerTable)

    def store_table(self, build_id: str, key: str, store: WorkerTableStore) -> TablePublic:
        answer = self._request(
            "PUT",
            f"/v1/worker/builds/{build_id}/tables/{key}",
            json=store.model_dump(mode="json"),
        )
        return TablePublic.model_validate_json(answer.content)

    def _get_or_none(self, path: str, model: type[M]) -> M | None:
        """:meth:`_get`; None where the API answers 404 (there is no such thing, or no more)."""
        try:
            return self._get(path, model)
        except ApiError as exc:
            if exc.status_code == 404:
                return None
            raise

    def download(self, kind: str, entry_id: str, file: InputFile, dest: Path) -> None:
        """Download one file of a stored model or dataset (``kind``: models or datasets) to
        ``dest``; :class:`DownloadError` (and no file) when its size or sha256 differ."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        try:
            with (
                self._http.stream(
                    "GET", f"/v1/worker/{kind}/{entry_id}/files/{file.path}"
                ) as answer,
                dest.open("wb") as out,
            ):
                if answer.status_code >= 400:
                    answer.read()
                    _raise_for_error(answer)
                for chunk in answer.iter_bytes(_CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except httpx.TransportError as exc:
            dest.unlink(missing_ok=True)
            raise ClientError(f"Cannot reach the trtforge API at {self.server}: {exc}") from exc
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        if size != file.size_bytes or digest.hexdigest() != file.sha256:
            dest.unlink(missing_ok=True)
            raise DownloadError(
                f"{file.path} of {kind[:-1]} {entry_id[:12]} arrived with {size} bytes and sha256 "
                f"{digest.hexdigest()[:12]}, not {file.size_bytes} bytes and {file.sha256[:12]}.",
                hint="The transfer was corrupted or the file changed; the build is retried.",
            )
