"""``/v1/worker/...``: what a build worker on another machine needs, with a ``worker`` token.

The queue operations (register, heartbeat, claim, finish, release, recover) call the app's
:class:`~service.queue.base.JobQueue`, whichever it is. A worker downloads the files of a
build's model and dataset (listed with their sha256), sends the build's progress and log lines,
stores and reads calibration tables, uploads the artifact and report (streamed to a temporary
file, sha256-checked), and ends the build: the API stores and links the results and writes the
outcome with the same code as a local build (:class:`service.worker.pipeline.LocalStore`,
:class:`service.worker.recorder.BuildRecorder`), so nothing is half-written.

Every write about a build is refused (409) unless the build is claimed by the worker that sends
it and not ended: a worker declared dead, whose build recovery gave to another, changes nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core.hashing import sha256_file
from engines.backends.base import BuildTarget
from service.api.deps import AppState, StateDep, WorkerAccess
from service.api.uploads import multipart_openapi, receive_upload
from service.db.models import BuildRow, DatasetRow, ModelRow, TableRow, WorkerRow, utcnow
from service.errors import ConflictError, NotFoundError, UploadError
from service.queue.base import Job
from service.schemas import (
    BuildStatus,
    InputFile,
    TablePublic,
    WorkerAlive,
    WorkerBuildFinish,
    WorkerBuildPlan,
    WorkerBuildState,
    WorkerBuildUpdate,
    WorkerCall,
    WorkerClaim,
    WorkerEvalDataset,
    WorkerJob,
    WorkerRecovered,
    WorkerRegistration,
    WorkerTable,
    WorkerTableStore,
)
from service.store.catalog import load_table, table_public
from service.worker.measures import EvalDataset
from service.worker.pipeline import LocalStore, load_plan
from service.worker.recorder import BuildRecorder, add_log

__all__ = ["router"]

router = APIRouter(prefix="/v1/worker", tags=["worker"])

_UPLOADS = "uploads"
"""Uploaded results wait in ``work/<build>/uploads/<sha256>`` on the API until ``/finish``."""
_MAX_HASHED = 4096
_hashed: dict[tuple[str, int, int], str] = {}
"""sha256 of stored input files by (path, size, mtime): stored entries never change."""


# -- the worker's lifecycle --------------------------------------------------------------------


@router.post("/register", operation_id="worker_register", status_code=204)
def register(body: WorkerRegistration, state: StateDep, _: WorkerAccess) -> Response:
    """A worker starts: its slots, targets and labels (``GET /v1/workers`` lists it), and where
    it runs (its machine; on the API's machine, its process, whose death is then seen at once)."""
    state.queue.register_worker(body.id, body.slots, body.targets, body.labels)
    if body.hostname:
        where = {"hostname": body.hostname, "pid": body.pid, "process_tag": body.process_tag}
        with state.db.session() as session:
            session.execute(update(WorkerRow).where(WorkerRow.id == body.id).values(**where))
            session.commit()
    return Response(status_code=204)


@router.post("/heartbeat", operation_id="worker_heartbeat", response_model=WorkerAlive)
def heartbeat(body: WorkerCall, state: StateDep, _: WorkerAccess) -> WorkerAlive:
    """The worker is alive; ``problem``: why it takes no builds now (None: it does)."""
    alive = state.queue.heartbeat(body.worker_id)
    if alive:
        with state.db.session() as session:
            session.execute(
                update(WorkerRow)
                .where(WorkerRow.id == body.worker_id, WorkerRow.problem.is_distinct_from(body.problem))
                .values(problem=body.problem)
            )
            session.commit()
    return WorkerAlive(alive=alive)


@router.post("/unregister", operation_id="worker_unregister", status_code=204)
def unregister(body: WorkerCall, state: StateDep, _: WorkerAccess) -> Response:
    state.queue.unregister_worker(body.worker_id)
    return Response(status_code=204)


@router.post("/recover", operation_id="worker_recover", response_model=WorkerRecovered)
def recover(state: StateDep, _: WorkerAccess) -> WorkerRecovered:
    """Re-queue (or fail) the builds of workers whose heartbeat went stale."""
    recovered = state.queue.recover()
    for build_id in (*recovered.requeued, *recovered.failed):
        state.storage.remove_entry(state.storage.work_dir(build_id))
    return WorkerRecovered(requeued=list(recovered.requeued), failed=list(recovered.failed))


@router.post(
    "/claim",
    operation_id="worker_claim",
    response_model=WorkerJob,
    responses={204: {"description": "No queued build this worker serves."}},
)
def claim(body: WorkerClaim, state: StateDep, _: WorkerAccess) -> WorkerJob | Response:
    targets: list[BuildTarget] = list(body.targets)
    job = state.queue.claim(body.worker_id, targets)
    if job is None:
        return Response(status_code=204)
    return WorkerJob(id=job.id, build_id=job.build_id, attempt=job.attempt)


@router.post("/jobs/finish", operation_id="worker_finish_job", status_code=204)
def finish_job(body: WorkerJob, state: StateDep, _: WorkerAccess) -> Response:
    """The job ended (its build is terminal)."""
    state.queue.finish(Job(id=body.id, build_id=body.build_id, attempt=body.attempt))
    state.storage.remove_entry(state.storage.work_dir(body.build_id))
    return Response(status_code=204)


@router.post("/jobs/release", operation_id="worker_release_job", status_code=204)
def release_job(body: WorkerJob, state: StateDep, _: WorkerAccess) -> Response:
    """Put a job back without counting the attempt (its worker shuts down)."""
    state.queue.release(Job(id=body.id, build_id=body.build_id, attempt=body.attempt))
    state.storage.remove_entry(state.storage.work_dir(body.build_id))
    return Response(status_code=204)


# -- one build's inputs ------------------------------------------------------------------------


@router.get("/builds/{build_id}", operation_id="worker_build_state", response_model=WorkerBuildState)
def build_state(build_id: str, state: StateDep, _: WorkerAccess) -> WorkerBuildState:
    with state.db.session() as session:
        return _state(_build(session, build_id))


@router.get(
    "/builds/{build_id}/plan", operation_id="worker_build_plan", response_model=WorkerBuildPlan
)
def build_plan(build_id: str, state: StateDep, _: WorkerAccess) -> WorkerBuildPlan:
    """The build's request, the target's backend, and the files of its model and dataset."""
    with state.db.session() as session:
        _build(session, build_id)
    plan = load_plan(state.db, state.storage, build_id)  # reads the build, model and dataset rows
    model_dir = state.storage.model_dir(plan.model_id)
    dataset_dir = state.storage.dataset_dir(plan.dataset_id)
    return WorkerBuildPlan(
        build_id=plan.build_id,
        request=plan.request,
        backend=plan.backend,
        model_id=plan.model_id,
        model_filename=plan.model_filename,
        onnx_filename=plan.model_path.relative_to(model_dir).as_posix(),
        model_files=_manifest(model_dir),
        dataset_id=plan.dataset_id,
        dataset_filename=plan.dataset_filename,
        data_filename=plan.dataset_path.relative_to(dataset_dir).as_posix(),
        dataset_files=_manifest(dataset_dir),
        preprocess=plan.preprocess,
        input_name=plan.input_name,
        eval_dataset=_eval_dataset(state, plan.eval_dataset),
    )


def _eval_dataset(state: AppState, evaluation: EvalDataset | None) -> WorkerEvalDataset | None:
    if evaluation is None:
        return None
    folder = state.storage.dataset_dir(evaluation.id)
    return WorkerEvalDataset(
        id=evaluation.id,
        data_filename=evaluation.path.relative_to(folder).as_posix(),
        files=_manifest(folder),
        preprocess=evaluation.preprocess,
        input_name=evaluation.input_name,
    )


def _manifest(folder: Path) -> list[InputFile]:
    files: list[InputFile] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        info = path.stat()
        key = (str(path), info.st_size, info.st_mtime_ns)
        if key not in _hashed:
            if len(_hashed) >= _MAX_HASHED:
                _hashed.clear()
            _hashed[key] = sha256_file(path)
        relative = path.relative_to(folder).as_posix()
        files.append(InputFile(path=relative, size_bytes=info.st_size, sha256=_hashed[key]))
    return files


@router.get("/models/{model_id}/files/{path:path}", operation_id="worker_model_file")
def model_file(model_id: str, path: str, state: StateDep, _: WorkerAccess) -> FileResponse:
    with state.db.session() as session:
        if session.get(ModelRow, model_id) is None:
            raise NotFoundError(f"No model with id {model_id!r}.", field="model_id")
    return _file(state.storage.model_dir(model_id), path)


@router.get("/datasets/{dataset_id}/files/{path:path}", operation_id="worker_dataset_file")
def dataset_file(dataset_id: str, path: str, state: StateDep, _: WorkerAccess) -> FileResponse:
    with state.db.session() as session:
        if session.get(DatasetRow, dataset_id) is None:
            raise NotFoundError(f"No dataset with id {dataset_id!r}.", field="dataset_id")
    return _file(state.storage.dataset_dir(dataset_id), path)


def _file(folder: Path, relative: str) -> FileResponse:
    root = folder.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise NotFoundError(f"No file {relative!r} in this entry.", field="path")
    return FileResponse(target, media_type="application/octet-stream")


# -- calibration tables ------------------------------------------------------------------------


@router.get("/tables/{key}", operation_id="worker_table", response_model=WorkerTable)
def get_table(key: str, state: StateDep, _: WorkerAccess) -> WorkerTable:
    """A stored table by id (= its cache key), with its JSON text; 404 when there is none."""
    with state.db.session() as session:
        row = session.get(TableRow, key)
        if row is None:
            raise NotFoundError(f"No calibration table with id {key!r}.", field="key")
        table = load_table(state.storage, row)
        return WorkerTable(info=table_public(row), table_json=table.to_json())


@router.put(
    "/builds/{build_id}/tables/{key}", operation_id="worker_store_table", response_model=TablePublic
)
def store_table(
    build_id: str, key: str, body: WorkerTableStore, state: StateDep, _: WorkerAccess
) -> TablePublic:
    """Store a table the build calibrated (uploaded first) under its cache key (the first one
    stored stays)."""
    from calibrators.errors import CalibrationError
    from calibrators.table import CalibrationTable

    with state.db.session() as session:
        _claimed(session, build_id, body.worker_id)
    uploaded = state.storage.work_dir(build_id) / _UPLOADS / body.table_sha256
    try:
        text = uploaded.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConflictError(
            "The table was not uploaded.",
            hint="Upload its JSON with POST /v1/worker/uploads first.",
            field="table_sha256",
        ) from exc
    try:
        table = CalibrationTable.from_json(text)
    except (CalibrationError, ValueError) as exc:
        raise UploadError(f"The table is not a trtforge table: {exc}", field="table_sha256") from exc
    finally:
        uploaded.unlink(missing_ok=True)
    store = LocalStore(load_plan(state.db, state.storage, build_id), state.db, state.storage)
    store.store(key, table)
    return store.table_info(key)


# -- a running build ---------------------------------------------------------------------------


@router.post(
    "/builds/{build_id}/update", operation_id="worker_update_build", response_model=WorkerBuildState
)
def update_build(
    build_id: str, body: WorkerBuildUpdate, state: StateDep, _: WorkerAccess
) -> WorkerBuildState:
    """Set the fields sent (status, stage, progress, stage timings, table) and add the log line,
    in one transaction; answers the build's state (whether a cancel was requested)."""
    sent = body.model_fields_set
    with state.db.session() as session:
        build = _claimed(session, build_id, body.worker_id)
        if body.started:
            build.started_at, build.stage_seconds = utcnow(), {}
        if "status" in sent and body.status is not None:
            build.status = body.status.value
        if "stage" in sent:
            build.stage = None if body.stage is None else body.stage.value
        if "progress" in sent and body.progress is not None:
            build.progress = round(body.progress, 4)
        if "stage_seconds" in sent and body.stage_seconds is not None:
            build.stage_seconds = dict(body.stage_seconds)
        if "table_id" in sent:
            build.table_id = body.table_id
        if "table_from_cache" in sent:
            build.table_from_cache = body.table_from_cache
        if body.log is not None:
            add_log(session, build_id, body.log.message, level=body.log.level, stage=body.log.stage)
        session.commit()
        return _state(build)


@router.post(
    "/uploads",
    operation_id="worker_upload",
    openapi_extra=multipart_openapi(
        {"build_id": "The build.", "worker_id": "The worker.", "sha256": "The file's sha256."}
    ),
)
async def upload(request: Request, state: StateDep, _: WorkerAccess) -> dict[str, object]:
    """An artifact or report of a build this worker runs, streamed to the API; kept until
    ``/finish`` links it (refused when its sha256 is not the one announced)."""
    received = await receive_upload(request, state.storage, state.settings.max_upload_bytes)
    with received.file:
        build_id = received.fields.get("build_id", "")
        worker_id = received.fields.get("worker_id", "")
        sha = received.file.sha256
        if received.fields.get("sha256") != sha:
            raise UploadError(
                f"The file arrived with sha256 {sha[:12]}, not the one announced.",
                hint="Send it again.",
                field="file",
            )

        def keep() -> None:
            with state.db.session() as session:
                _claimed(session, build_id, worker_id)
            folder = state.storage.work_dir(build_id) / _UPLOADS
            folder.mkdir(parents=True, exist_ok=True)
            received.file.take().replace(folder / sha)

        await run_in_threadpool(keep)
        size = received.file.size_bytes
    return {"sha256": sha, "size_bytes": size}


@router.post(
    "/builds/{build_id}/finish", operation_id="worker_finish_build", response_model=WorkerBuildState
)
def finish_build(
    build_id: str, body: WorkerBuildFinish, state: StateDep, _: WorkerAccess
) -> WorkerBuildState:
    """End the build: its uploaded artifact and report stored as blobs and linked (with the
    sidecar), and its outcome recorded. A build that has ended already is left as it is."""
    with state.db.session() as session:
        build = session.get(BuildRow, build_id)
        if build is not None and BuildStatus(build.status).terminal:
            return _state(build)
        _claimed(session, build_id, body.worker_id)
    uploads = state.storage.work_dir(build_id) / _UPLOADS
    published: dict[str, object] = {}
    if body.artifact is not None:
        artifact = uploads / body.artifact.sha256
        report = uploads / body.artifact.report_sha256
        if not artifact.is_file() or not report.is_file():
            raise ConflictError(
                "The artifact or report of this build was not uploaded.",
                hint="Upload both with POST /v1/worker/uploads, then finish the build.",
                field="artifact",
            )
        if artifact == report:  # the same bytes twice: one file each for the blob store
            report = uploads / f"{body.artifact.report_sha256}.report"
            shutil.copyfile(artifact, report)
        store = LocalStore(load_plan(state.db, state.storage, build_id), state.db, state.storage)
        published = store.publish(
            artifact=artifact,
            artifact_sha256=body.artifact.sha256,
            artifact_filename=body.artifact.filename,
            artifact_metadata=body.artifact.metadata.model_dump(mode="json"),
            report=report,
        )
    recorder = BuildRecorder(state.db, build_id, data_dir=state.settings.data_dir)
    if body.status is BuildStatus.SUCCEEDED:
        recorder.succeed(**published)
    elif body.status is BuildStatus.FAILED:
        error = body.error
        recorder.fail(
            error.code if error else "build_failed",
            error.message if error else "The build failed on its worker.",
            error.hint if error else "",
            details=body.details,
            **published,
        )
    else:
        recorder.cancelled()
    shutil.rmtree(uploads, ignore_errors=True)
    with state.db.session() as session:
        return _state(_build(session, build_id))


# -- helpers -----------------------------------------------------------------------------------


def _build(session: Session, build_id: str) -> BuildRow:
    build = session.get(BuildRow, build_id)
    if build is None:
        raise NotFoundError(f"No build with id {build_id!r}.", field="build_id")
    return build


def _claimed(session: Session, build_id: str, worker_id: str) -> BuildRow:
    """The build, when ``worker_id`` holds it and it has not ended; else 409."""
    build = _build(session, build_id)
    if build.worker_id != worker_id or BuildStatus(build.status).terminal:
        raise ConflictError(
            f"Worker {worker_id!r} does not hold build {build_id!r} (it is {build.status}, "
            f"claimed by {build.worker_id!r}).",
            hint="The worker was declared dead and its build re-queued; it stops this build.",
            field="worker_id",
        )
    return build


def _state(build: BuildRow) -> WorkerBuildState:
    return WorkerBuildState(
        status=BuildStatus(build.status),
        cancel_requested=bool(build.cancel_requested),
        worker_id=build.worker_id,
    )
