"""One build of a worker on another machine, in its child process: the same pipeline as every
build (:func:`service.worker.pipeline.execute`), reading and recording through the API.

- **Inputs.** The model's and dataset's files are listed by the API with their sizes and
  sha256; each is downloaded into a staging folder of the worker's data directory, checked, and
  the folder is published in one rename as ``models/<id>`` or ``datasets/<id>``: the worker's
  cache, keyed by the digest ids the API gives them, used again by later builds (its files' sizes
  are checked each time), bounded by :class:`~service.worker.input_cache.InputCache` (what a
  running build uses is pinned; the rest goes least recently used first).
- **Records.** :class:`RemoteRecorder` sends status, stage, progress, stage timings and log
  lines to ``/v1/worker/builds/{id}/update``; a cancel request is read at every stage boundary.
- **Results.** :class:`RemoteStore` uploads the artifact and the report (streamed, sha256-checked
  by the API), then ``/finish`` sends the outcome with the sidecar: the API stores both as blobs
  and links them to the build row in one transaction, with the same store code as a local build.
  Calibration tables go to and come from the API's table store.

The API refuses every write from a worker that no longer holds the build (409): recovery gave it
to another worker; this child then stops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import BuildCancelledError, NotFoundError, ServiceError, scrub_paths
from service.schemas import (
    BuildStatus,
    ErrorInfo,
    InputFile,
    Stage,
    TablePublic,
    WorkerArtifact,
    WorkerBuildFinish,
    WorkerBuildPlan,
    WorkerBuildUpdate,
    WorkerLogLine,
    WorkerTableStore,
)
from service.settings import Settings
from service.store.storage import Storage
from service.worker.input_cache import InputCache
from service.worker.limits import resource_limit_failure
from service.worker.measures import EvalDataset
from service.worker.pipeline import BuildPlan, BuildStore, execute
from service.worker.recorder import RecorderBase
from service.worker.remote_client import RemoteAccess, WorkerClient

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable

__all__ = ["RemoteRecorder", "RemoteStore", "fetch_entry", "run_remote_build"]

log = logging.getLogger(__name__)

_UPDATE_FIELDS = ("status", "stage", "progress", "stage_seconds", "table_id", "table_from_cache")


def run_remote_build(
    build_id: str,
    attempt: int,
    access: RemoteAccess,
    settings: Settings,
    memory_limit: int | None,
    cancelled: type[BaseException],
    *,
    client: WorkerClient | None = None,
) -> str:
    """Run the claimed build ``build_id`` to a terminal status recorded through the API;
    returns that status. ``cancelled`` is what SIGTERM raises (the worker's cancel); ``client``
    (kept open) instead of a new one for ``access``."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    storage = Storage(settings.data_dir)
    own = client is None
    client = client or WorkerClient(access.api_url, access.token)
    recorder = RemoteRecorder(client, build_id, access.worker_id, settings.data_dir)
    cache = InputCache(storage, settings.worker_cache_bytes or None)

    def prepare() -> tuple[BuildPlan, BuildStore]:
        plan = client.plan(build_id)
        local = _local_plan(plan, client, cache, recorder)
        return local, RemoteStore(client, build_id, access.worker_id)

    try:
        with cache.holding(storage.work_dir(build_id)):
            try:
                status = execute(
                    recorder,
                    prepare,
                    work=storage.work_dir(build_id),
                    settings=settings,
                    attempt=attempt,
                ).value
            except MemoryError:
                status = None
            except cancelled:
                recorder.cancelled()
                return BuildStatus.CANCELLED.value
        if status is None:  # out of the except block: what was allocated is gone now
            recorder.fail(*resource_limit_failure("an allocation failed", memory_limit))
            status = BuildStatus.FAILED.value
        return status
    finally:
        storage.remove_own_tmp()
        if own:
            client.close()


def _local_plan(
    plan: WorkerBuildPlan, client: WorkerClient, cache: InputCache, recorder: RecorderBase
) -> BuildPlan:
    """The build's plan with its inputs in this worker's cache (pinned, downloaded when
    missing), the cache trimmed to its bound afterwards."""
    storage = cache.storage

    def fetch(kind: str, entry_id: str, files: list[InputFile], dest: Path) -> Path:
        cache.pin(dest)
        return fetch_entry(client, storage, kind, entry_id, files, dest)

    model_dir = fetch("models", plan.model_id, plan.model_files, storage.model_dir(plan.model_id))
    dataset_dir = fetch(
        "datasets", plan.dataset_id, plan.dataset_files, storage.dataset_dir(plan.dataset_id)
    )
    evaluation = None
    if plan.eval_dataset is not None:
        wanted = plan.eval_dataset
        folder = fetch("datasets", wanted.id, wanted.files, storage.dataset_dir(wanted.id))
        path = folder / wanted.data_filename
        evaluation = EvalDataset(wanted.id, path, wanted.preprocess, wanted.input_name)
    recorder.log(
        f"Inputs in this worker's cache: model {plan.model_id[:12]}, dataset {plan.dataset_id[:12]}"
        + (f", evaluation dataset {evaluation.id[:12]}." if evaluation else ".")
    )
    _report_trim(cache, recorder)
    return BuildPlan(
        build_id=plan.build_id,
        request=plan.request,
        backend=plan.backend,
        model_id=plan.model_id,
        model_filename=plan.model_filename,
        model_path=model_dir / plan.onnx_filename,
        dataset_id=plan.dataset_id,
        dataset_filename=plan.dataset_filename,
        dataset_path=dataset_dir / plan.data_filename,
        preprocess=plan.preprocess,
        input_name=plan.input_name,
        eval_dataset=evaluation,
    )


def _report_trim(cache: InputCache, recorder: RecorderBase) -> None:
    trimmed = cache.trim()
    entries = [p for p in trimmed.removed if p.parent != cache.storage.work_root]
    if entries:
        recorder.log(
            f"Worker cache trimmed: {len(entries)} unused input(s) removed, "
            f"{trimmed.freed_bytes / 2**20:.1f} MiB freed."
        )
    if trimmed.over_by_pinned:
        recorder.log(
            f"Worker cache is {trimmed.over_by_pinned / 2**20:.1f} MiB over "
            "TRTFORGE_WORKER_CACHE_BYTES with inputs running builds need; they stay.",
            level="warning",
        )


def fetch_entry(
    client: WorkerClient,
    storage: Storage,
    kind: str,
    entry_id: str,
    files: list[InputFile],
    dest: Path,
) -> Path:
    """The folder ``dest`` holding ``files`` of a stored model or dataset: reused when every
    file is there with its size, else downloaded (each checked against its sha256) into a
    staging folder and published in one rename."""
    if dest.is_dir() and all(_has(dest, file) for file in files):
        return dest
    with storage.staging_dir() as staging:
        entry = staging / "entry"
        for file in files:
            target = _inside(entry, file.path)
            client.download(kind, entry_id, file, target)
        if dest.is_dir() and all(_has(dest, file) for file in files):
            return dest  # another build of this worker fetched it meanwhile (and may read it)
        storage.remove_entry(dest)  # an incomplete or changed copy
        if not storage.publish_dir(entry, dest) and not all(_has(dest, f) for f in files):
            raise ServiceError(f"The cached copy of {kind[:-1]} {entry_id[:12]} is incomplete.")
    log.info("fetched %s %s (%d file(s))", kind[:-1], entry_id[:12], len(files))
    return dest


def _inside(folder: Path, relative: str) -> Path:
    target = (folder / relative).resolve()
    if not target.is_relative_to(folder.resolve()) or not relative:
        raise ServiceError(f"The API listed a file outside its folder: {relative!r}.")
    return target


def _has(folder: Path, file: InputFile) -> bool:
    path = folder / file.path
    return path.is_file() and path.stat().st_size == file.size_bytes


class RemoteRecorder(RecorderBase):
    """:class:`~service.worker.recorder.RecorderBase` through ``/v1/worker/builds/{id}/...``."""

    def __init__(
        self, client: WorkerClient, build_id: str, worker_id: str, data_dir: Path | None
    ) -> None:
        super().__init__(build_id, data_dir=data_dir)
        self.client = client
        self.worker_id = worker_id

    def _send(self, **fields: Any) -> bool:
        """Send an update; whether a cancel was requested."""
        update = WorkerBuildUpdate(worker_id=self.worker_id, **fields)
        return self.client.update(self.build_id, update).cancel_requested

    def _update(self, line: tuple[str, str] | None = None, **values: Any) -> object:
        fields: dict[str, Any] = {k: values[k] for k in _UPDATE_FIELDS if k in values}
        if "started_at" in values:
            fields["started"] = True
        unknown = set(values) - set(_UPDATE_FIELDS) - {"started_at"}
        if unknown:
            raise ValueError(f"not sent through the API: {sorted(unknown)}")
        if line is not None:
            self._echo(*line)
            fields["log"] = _line(line[0], line[1], None)
        return self._send(**fields)

    def log(self, message: str, *, level: str = "info", stage: Stage | None = None) -> None:
        self._echo(level, message)
        self._send(log=_line(level, scrub_paths(message, self.data_dir), stage))

    def check_cancel(self) -> None:
        state = self.client.build_state(self.build_id)
        if state is None or state.cancel_requested:
            raise BuildCancelledError("The build was cancelled.")

    def _finish(self, status: BuildStatus, **fields: Any) -> None:
        finish = WorkerBuildFinish(worker_id=self.worker_id, status=status, **fields)
        self.client.finish(self.build_id, finish)

    def succeed(self, **artifact: Any) -> None:
        self._echo("info", "Build succeeded.")
        self._finish(BuildStatus.SUCCEEDED, artifact=artifact.get("artifact"))

    def fail(
        self, code: str, message: str, hint: str = "", details: str = "", **artifact: Any
    ) -> None:
        message, hint = scrub_paths(message, self.data_dir), scrub_paths(hint, self.data_dir)
        self._echo("error", f"Build failed: {message}")
        self._finish(
            BuildStatus.FAILED,
            error=ErrorInfo(code=code, message=message, hint=hint),
            details=scrub_paths(details, self.data_dir)[:200_000],
            artifact=artifact.get("artifact"),
        )

    def cancelled(self) -> None:
        self._echo("warning", "Build cancelled.")
        self._finish(BuildStatus.CANCELLED)


def _line(level: str, message: str, stage: Stage | None) -> WorkerLogLine:
    known = level if level in ("debug", "info", "warning", "error") else "info"
    return WorkerLogLine.model_validate({"level": known, "stage": stage, "message": message[:20_000]})


class RemoteStore:
    """:class:`~service.worker.pipeline.BuildStore` through the API (module docstring)."""

    def __init__(self, client: WorkerClient, build_id: str, worker_id: str) -> None:
        self._client, self._build_id, self._worker_id = client, build_id, worker_id
        self._infos: dict[str, TablePublic] = {}

    def lookup(self, key: str) -> CalibrationTable | None:
        from calibrators.table import CalibrationTable

        found = self._client.table(key)
        if found is None:
            return None
        self._infos[key] = found.info
        return CalibrationTable.from_json(found.table_json)

    def store(self, key: str, table: CalibrationTable) -> None:
        text = table.to_json().encode("utf-8")
        sha = self._client.upload_bytes(self._build_id, self._worker_id, "table.json", text)
        body = WorkerTableStore(worker_id=self._worker_id, table_sha256=sha)
        self._infos[key] = self._client.store_table(self._build_id, key, body)

    def given_table(self, table_id: str) -> CalibrationTable:
        table = self.lookup(table_id)
        if table is None:
            raise NotFoundError(f"No calibration table with id {table_id!r}.", field="table_id")
        return table

    def table_info(self, table_id: str) -> TablePublic:
        if table_id not in self._infos:
            found = self._client.table(table_id)
            if found is None:
                raise NotFoundError(f"No calibration table with id {table_id!r}.")
            self._infos[table_id] = found.info
        return self._infos[table_id]

    def publish(
        self,
        *,
        artifact: Path,
        artifact_sha256: str,
        artifact_filename: str,
        artifact_metadata: dict[str, Any],
        report: Path,
    ) -> dict[str, Any]:
        """Upload both files; the build is linked to them when it finishes (``/finish``)."""
        from engines.backends.base import ArtifactMetadata

        sent = self._client.upload(self._build_id, self._worker_id, artifact)
        if sent != artifact_sha256:
            raise ServiceError(
                f"The artifact's bytes (sha256 {sent[:12]}) are not the ones its sidecar names "
                f"({artifact_sha256[:12]}).",
                hint="The artifact changed after it was built; this is a trtforge bug.",
            )
        report_sha = self._client.upload(self._build_id, self._worker_id, report)
        artifact.unlink(missing_ok=True)
        report.unlink(missing_ok=True)
        return {
            "artifact": WorkerArtifact(
                filename=artifact_filename,
                sha256=artifact_sha256,
                metadata=ArtifactMetadata.model_validate(artifact_metadata),
                report_sha256=report_sha,
            )
        }

