"""The Python client of the trtforge service (httpx), for build pipelines and the CLI.

::

    with TrtforgeClient("http://127.0.0.1:8000", token=None) as client:
        model = client.upload_model(Path("model.onnx"))
        data = client.upload_dataset(Path("calib.npz"), model_id=model.id)
        build = client.submit_build(model.id, data.id, BuildSpec(precision=Precision.INT8_FP16))
        build = client.wait(build.id, timeout_s=3600)
        client.download_artifact(build.id, Path("out/"))

Results are the API's typed models (:mod:`service.schemas`). Every error the server answers is
raised as :class:`~service.errors.ApiError` carrying its code, message and hint; transport
failures as :class:`~service.errors.ClientError`. Downloads resume from a ``.part`` file and are
checked against the artifact's sha256.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from calibrators.spec import PreprocessSpec
from engines.accuracy_report import MetricBudget
from engines.spec import BuildSpec
from service.client_resources import ResourcesMixin
from service.errors import ApiError, ClientError, DownloadError, WaitTimeoutError
from service.schemas import (
    AccuracyOptions,
    BenchmarkOptionsIn,
    BuildCreate,
    BuildPage,
    BuildPublic,
    BuildReport,
    BuildStatus,
    CalibrationOptions,
    DatasetPage,
    DatasetPublic,
    LogLine,
    ModelPage,
    ModelPublic,
    Readiness,
    Scope,
    SensitivityOptions,
    TablePage,
    TablePublic,
    TargetRequest,
    TokenCreated,
    TokenPublic,
    WorkerPublic,
)

__all__ = ["BuildEvent", "ProgressFn", "TrtforgeClient"]

ProgressFn = Callable[[int, int], None]
"""Called with (bytes done, bytes in total)."""

M = TypeVar("M", bound=BaseModel)
_CHUNK_BYTES = 1 << 20
_DOWNLOAD_RETRIES = 3


@dataclass(frozen=True)
class BuildEvent:
    """One server-sent event of a build: ``status`` (with the build), ``log`` or ``end``."""

    kind: str
    build: BuildPublic | None = None
    log: LogLine | None = None
    status: BuildStatus | None = None


class _ProgressReader:
    """A binary file whose reads report progress (httpx streams multipart files by reading)."""

    def __init__(self, fh: IO[bytes], total: int, progress: ProgressFn | None) -> None:
        self._fh = fh
        self._total = total
        self._progress = progress
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        self._done += len(chunk)
        if self._progress is not None:
            self._progress(min(self._done, self._total), self._total)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._fh.seek(offset, whence)
        self._done = position
        return position

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:
        return self._fh.fileno()


class TrtforgeClient(ResourcesMixin):
    """A connection to one trtforge server. Use it in a ``with`` block (or call :meth:`close`)."""

    def __init__(
        self,
        server: str = "http://127.0.0.1:8000",
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        project: str | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.project = project
        """For admin tokens: the project uploads go to and lists show (``?project=``); other
        tokens always work in their own."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.server, headers=headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TrtforgeClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.project is not None:
            kwargs["params"] = {**(kwargs.get("params") or {}), "project": self.project}
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(f"Cannot reach the trtforge server at {self.server}: {exc}") from exc
        _raise_for_error(response)
        return response

    def _get(self, path: str, model: type[M], **params: Any) -> M:
        query = {k: v for k, v in params.items() if v is not None}
        return model.model_validate_json(self._request("GET", path, params=query).content)

    def _upload(
        self,
        path: str,
        file: Path,
        fields: dict[str, str],
        model: type[M],
        progress: ProgressFn | None,
    ) -> M:
        file = Path(file)
        try:
            fh = file.open("rb")
        except OSError as exc:
            raise ClientError(f"Cannot read {str(file)!r}: {exc.strerror or exc}.") from exc
        with fh:
            reader = _ProgressReader(fh, file.stat().st_size, progress)
            files = {"file": (file.name, reader, "application/octet-stream")}
            response = self._request("POST", path, files=files, data=fields)
        return model.model_validate_json(response.content)

    # -- health ------------------------------------------------------------------------------

    def healthz(self) -> bool:
        body: dict[str, str] = self._request("GET", "/healthz").json()
        return body.get("status") == "ok"

    def readyz(self) -> Readiness:
        try:
            response = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise ClientError(f"Cannot reach the trtforge server at {self.server}: {exc}") from exc
        if response.status_code not in (200, 503):
            _raise_for_error(response)
        return Readiness.model_validate_json(response.content)  # 503 bodies add "error"

    # -- models ------------------------------------------------------------------------------

    def upload_model(
        self,
        path: Path,
        *,
        name: str | None = None,
        tags: list[str] | None = None,
        progress: ProgressFn | None = None,
    ) -> ModelPublic:
        """Upload an ``.onnx`` (or ``.zip`` of it with its external data), optionally named and
        tagged."""
        return self._upload("/v1/models", path, _named({}, name, tags), ModelPublic, progress)

    def get_model(self, model_id: str) -> ModelPublic:
        return self._get(f"/v1/models/{model_id}", ModelPublic)

    def list_models(
        self,
        *,
        name: str | None = None,
        tags: list[str] | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> ModelPage:
        """Models, newest first: ``name`` in their name or file name, carrying every tag."""
        return self._get("/v1/models", ModelPage, name=name, tag=tags, limit=limit, offset=offset)

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/v1/models/{model_id}")

    # -- datasets ----------------------------------------------------------------------------

    def upload_dataset(
        self,
        path: Path,
        *,
        model_id: str | None = None,
        preprocess: PreprocessSpec | None = None,
        input_name: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        progress: ProgressFn | None = None,
    ) -> DatasetPublic:
        """Upload a calibration dataset, validated against ``model_id``'s inputs when given."""
        fields = {"model_id": model_id, "input_name": input_name}
        form = _named({k: v for k, v in fields.items() if v}, name, tags)
        if preprocess is not None:
            form["preprocess"] = preprocess.model_dump_json()
        return self._upload("/v1/datasets", path, form, DatasetPublic, progress)

    def get_dataset(self, dataset_id: str) -> DatasetPublic:
        return self._get(f"/v1/datasets/{dataset_id}", DatasetPublic)

    def list_datasets(
        self,
        *,
        model_id: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> DatasetPage:
        return self._get(
            "/v1/datasets",
            DatasetPage,
            model_id=model_id,
            name=name,
            tag=tags,
            limit=limit,
            offset=offset,
        )

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # -- builds ------------------------------------------------------------------------------

    def submit_build(
        self,
        model_id: str,
        dataset_id: str,
        spec: BuildSpec | None = None,
        *,
        table_id: str | None = None,
        calibration: CalibrationOptions | None = None,
        benchmark: BenchmarkOptionsIn | None = None,
        accuracy: AccuracyOptions | None = None,
        target: TargetRequest | None = None,
        eval_dataset_id: str | None = None,
        labels: list[int] | None = None,
        accuracy_budget: MetricBudget | str | None = None,
        sensitivity: SensitivityOptions | None = None,
    ) -> BuildPublic:
        """Queue a build (or get the existing build of an identical request); ``target`` asks
        for a worker (GPU, TensorRT version, labels). ``eval_dataset_id`` and ``labels``: a
        separate evaluation set and its class labels; ``accuracy_budget``: ``METRIC:VALUE`` the
        build keeps nodes out of INT8 for; ``sensitivity``: also rank the nodes."""
        body = BuildCreate(
            model_id=model_id,
            dataset_id=dataset_id,
            table_id=table_id,
            spec=spec or BuildSpec(),
            calibration=calibration or CalibrationOptions(),
            benchmark=benchmark or BenchmarkOptionsIn(),
            accuracy=accuracy or AccuracyOptions(),
            target=target,
            eval_dataset_id=eval_dataset_id,
            labels=labels,
            accuracy_budget=accuracy_budget,
            sensitivity=sensitivity,
        )
        wire = body.model_dump(mode="json", exclude_none=True)  # older servers: no new fields
        response = self._request("POST", "/v1/builds", json=wire)
        return BuildPublic.model_validate_json(response.content)

    def get_build(self, build_id: str) -> BuildPublic:
        return self._get(f"/v1/builds/{build_id}", BuildPublic)

    def list_builds(
        self,
        *,
        model_id: str | None = None,
        status: BuildStatus | None = None,
        model_name: str | None = None,
        model_tags: list[str] | None = None,
        precision: str | None = None,
        backend: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> BuildPage:
        """Builds, newest first: of a model (its id, or part of its name or file name and its
        tags), in a status, of a precision, for a backend (built for or asked for)."""
        return self._get(
            "/v1/builds",
            BuildPage,
            model_id=model_id,
            status=status.value if status else None,
            model_name=model_name,
            model_tag=model_tags,
            precision=precision,
            backend=backend,
            limit=limit,
            offset=offset,
        )

    def workers(self, *, include_stopped: bool = False) -> list[WorkerPublic]:
        """Live workers (all with ``include_stopped``), newest first, with their targets."""
        response = self._request(
            "GET", "/v1/workers", params={"include_stopped": include_stopped}
        )
        return TypeAdapter(list[WorkerPublic]).validate_json(response.content)

    def cancel_build(self, build_id: str) -> BuildPublic:
        response = self._request("POST", f"/v1/builds/{build_id}/cancel")
        return BuildPublic.model_validate_json(response.content)

    def delete_build(self, build_id: str) -> None:
        self._request("DELETE", f"/v1/builds/{build_id}")

    def logs(self, build_id: str, *, after: int = 0) -> list[LogLine]:
        response = self._request("GET", f"/v1/builds/{build_id}/logs", params={"after": after})
        return TypeAdapter(list[LogLine]).validate_json(response.content)

    def events(self, build_id: str, *, read_timeout_s: float | None = 60.0) -> Iterator[BuildEvent]:
        """Follow the build's server-sent events until it ends (the stream closes then)."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout_s)
        try:
            with self._http.stream(
                "GET", f"/v1/builds/{build_id}/events", timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                yield from _parse_events(response.iter_lines())
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            raise ClientError(f"The event stream of build {build_id} broke: {exc}") from exc

    def wait(
        self,
        build_id: str,
        *,
        timeout_s: float | None = None,
        on_event: Callable[[BuildEvent], None] | None = None,
    ) -> BuildPublic:
        """Block until the build ends and return it; raises :class:`WaitTimeoutError`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeoutError(f"Build {build_id} did not end within {timeout_s} s.")
            read = 30.0 if remaining is None else max(0.1, min(30.0, remaining))
            try:
                for event in self.events(build_id, read_timeout_s=read):
                    if on_event is not None:
                        on_event(event)
                    if deadline is not None and time.monotonic() > deadline:
                        break
            except (httpx.TimeoutException, ClientError):
                pass  # a quiet or broken stream: check the deadline, then reconnect
            build = self.get_build(build_id)
            if build.status.terminal:
                return build

    # -- artifacts and reports ---------------------------------------------------------------

    def artifact_metadata(self, build_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self._request(
            "GET", f"/v1/builds/{build_id}/artifact/metadata"
        ).json()
        return data

    def download_artifact(
        self, build_id: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> Path:
        """Download the artifact to ``dest`` (a file, or a folder to put it in), and its metadata
        sidecar beside it as ``<file>.json`` (what built it, for which GPU, with which table).

        An interrupted download leaves ``<file>.part`` and the next call resumes it with a Range
        request; the result is checked against the artifact's sha256 before it is renamed.
        """
        build = self.get_build(build_id)
        if build.artifact is None:
            raise ClientError(
                f"Build {build_id} has no artifact (status {build.status.value}).",
                hint="Wait for it to succeed: `trtforge status ID` or client.wait(ID).",
            )
        dest = Path(dest)
        target = dest / build.artifact.filename if dest.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        for attempt in range(_DOWNLOAD_RETRIES):
            try:
                self._fetch(
                    build_id, build.artifact.sha256, build.artifact.size_bytes, part, progress
                )
                break
            except httpx.TransportError as exc:
                if attempt == _DOWNLOAD_RETRIES - 1:
                    raise ClientError(f"The download of build {build_id} broke: {exc}") from exc
        _verify(part, build.artifact.sha256, build.artifact.size_bytes)
        sidecar = target.with_name(target.name + ".json")
        sidecar_part = sidecar.with_name(sidecar.name + ".part")
        sidecar_part.write_text(json.dumps(self.artifact_metadata(build_id), indent=2))
        part.replace(target)
        sidecar_part.replace(sidecar)
        return target

    def _fetch(
        self, build_id: str, sha256: str, size: int, part: Path, progress: ProgressFn | None
    ) -> None:
        offset = part.stat().st_size if part.exists() else 0
        if offset >= size:
            if offset == size:
                return
            part.unlink()
            offset = 0
        headers = {"Range": f"bytes={offset}-", "If-Range": f'"{sha256}"'} if offset else {}
        with self._http.stream(
            "GET", f"/v1/builds/{build_id}/artifact", headers=headers
        ) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_error(response)
            if response.status_code != 206:
                offset = 0
            with part.open("ab" if offset else "wb") as out:
                done = offset
                for chunk in response.iter_bytes(_CHUNK_BYTES):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, size)

    def report(self, build_id: str) -> BuildReport:
        return self._get(f"/v1/builds/{build_id}/report", BuildReport)

    def report_html(self, build_id: str) -> str:
        return self._request("GET", f"/v1/builds/{build_id}/report", params={"format": "html"}).text

    # -- calibration tables ------------------------------------------------------------------

    def list_tables(
        self, *, model_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> TablePage:
        return self._get(
            "/v1/calibration-tables", TablePage, model_id=model_id, limit=limit, offset=offset
        )

    def get_table(self, table_id: str) -> TablePublic:
        return self._get(f"/v1/calibration-tables/{table_id}", TablePublic)

    def table_text(
        self, table_id: str, *, format: str = "trt", trt_version: str | None = None
    ) -> str:
        """The table as TensorRT cache text (``trt``) or trtforge JSON (``json``)."""
        params = {"format": format} | ({"trt_version": trt_version} if trt_version else {})
        return self._request("GET", f"/v1/calibration-tables/{table_id}", params=params).text

    def import_table(
        self, model_id: str, path: Path, *, ignore_unknown: bool = False
    ) -> TablePublic:
        """Import a TensorRT calibration cache (or trtforge JSON table) for a model."""
        fields = {"model_id": model_id, "ignore_unknown": "true" if ignore_unknown else "false"}
        return self._upload("/v1/calibration-tables", path, fields, TablePublic, None)

    # -- tokens (admin) ----------------------------------------------------------------------

    def create_token(
        self, name: str, scope: Scope = Scope.READ, project: str | None = None
    ) -> TokenCreated:
        body = {"name": name, "scope": Scope(scope).value}
        if project is not None:
            body["project"] = project
        response = self._request("POST", "/v1/tokens", json=body)
        return TokenCreated.model_validate_json(response.content)

    def list_tokens(self) -> list[TokenPublic]:
        response = self._request("GET", "/v1/tokens")
        return TypeAdapter(list[TokenPublic]).validate_json(response.content)

    def revoke_token(self, token_id: str) -> None:
        self._request("DELETE", f"/v1/tokens/{token_id}")


def _named(form: dict[str, str], name: str | None, tags: list[str] | None) -> dict[str, str]:
    """Upload form fields with the ``name`` and ``tags`` (comma-separated) given."""
    if name is not None:
        form["name"] = name
    if tags is not None:
        form["tags"] = ",".join(tags)
    return form


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message, hint = str(error["message"]), str(error.get("hint") or "")
        code, field = str(error.get("code", "")), error.get("field")
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200]}"
        hint, code, field = "", "", None
    raise ApiError(
        message, hint=hint, field=field, status_code=response.status_code, remote_code=code
    )


def _parse_events(lines: Iterator[str]) -> Iterator[BuildEvent]:
    kind, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield _event(kind, "\n".join(data))
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


def _event(kind: str, data: str) -> BuildEvent:
    if kind == "status":
        build = BuildPublic.model_validate_json(data)
        return BuildEvent(kind=kind, build=build, status=build.status)
    if kind == "log":
        return BuildEvent(kind=kind, log=LogLine.model_validate_json(data))
    if kind == "end":
        return BuildEvent(kind=kind, status=BuildStatus(json.loads(data)["status"]))
    return BuildEvent(kind=kind)


def _verify(part: Path, sha256: str, size: int) -> None:
    digest = hashlib.sha256()
    with part.open("rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    actual = part.stat().st_size
    if actual != size or digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"The downloaded artifact does not match the server's ({actual} of {size} bytes, "
            f"sha256 {digest.hexdigest()[:12]} instead of {sha256[:12]}); it was deleted."
        )
