"""Builds: submission with cache-key deduplication, listing, cancellation, logs, deletion.

A build's cache key is sha256(model) + sha256(dataset) + spec digest (with the backend asked for)
+ calibration, benchmark and accuracy options (+ the calibration table, when one is given; + the
target asked for, when one is: GPU, TensorRT version, labels):
submitting an identical request returns the existing build instead of building again. A request
that differs only in its benchmark or accuracy-check options is a new build with its own report;
its calibration comes from the table cache, so only the engine build and the measurements run
again. The target is decided where the build runs: the row records the target asked for
(``requested_target``), and the worker that claims it (one whose targets and labels match) writes
the backend, its version and the compute capability it builds for into the row
(:meth:`service.queue.base.JobQueue.claim`).

A build belongs to its model's project (:mod:`service.projects`); its model, dataset and table
must all be of one project, and ids are per project, so no build (and no calibration table) is
ever reused across projects. Every function that takes ``project`` finds only that project's
builds (None: every project's).

Deleting races with submitting: a model, dataset or table deleted while a build referencing it
is committed answers :class:`ConflictError` (HTTP 409), and so does a build deleted while it is
submitted again. A build's artifact and report are linked to it under their blobs' locks
(:func:`link_build_files`), so deleting another build with byte-identical files never removes
them (:mod:`service.store.blobs`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from sqlalchemy import delete, or_, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from calibrators.errors import DatasetError
from core.errors import ModelError
from engines.backends.registry import choose_target, version_requestable
from engines.spec import BackendName, Precision
from service.db.models import BuildLogRow, BuildRow, DatasetRow, JobRow, ModelRow, utcnow
from service.errors import ConflictError, NoTargetError, NotFoundError
from service.projects import DEFAULT_PROJECT
from service.queue.base import JobQueue, JobState
from service.queue.targets import describe_worker, serving_target
from service.schemas import (
    ArtifactInfo,
    BuildCreate,
    BuildPublic,
    BuildStatus,
    ErrorInfo,
    LogLine,
    Stage,
    TargetRequest,
)
from service.store.blobs import commit_and_release, place_blob
from service.store.catalog import Page, get_dataset, get_model, get_table, model_path
from service.store.evaluation import check_evaluation
from service.store.naming import filter_named
from service.store.rows import newest_first, visible
from service.store.storage import Storage
from service.worker.recorder import add_log, reset_for_retry

__all__ = [
    "build_cache_key",
    "build_public",
    "cancel_build",
    "delete_build",
    "get_build",
    "link_build_files",
    "list_builds",
    "log_lines",
    "submit_build",
]


def build_cache_key(request: BuildCreate, project: str = DEFAULT_PROJECT) -> str:
    """sha256 over the whole request, normalized (module docstring): what decides the artifact
    and what decides the report. Options left out equal their defaults given explicitly. Another
    project than ``default`` is part of the key (its ids already are: belt and braces)."""
    parts = [
        request.model_id,
        request.dataset_id,
        request.table_id or "-",
        request.spec.digest,
        request.calibration.model_dump_json(),
        request.accuracy.model_dump_json(),
        request.benchmark.model_dump_json(),
    ]
    target = _requested_target(request)
    if target is not None:  # untargeted requests keep the keys they had before targets existed
        parts.append(target.model_dump_json())
    evaluation = request.evaluation_options
    if evaluation:  # requests without them keep the keys they had before they existed
        parts.append(json.dumps(evaluation, sort_keys=True, separators=(",", ":")))
    if project != DEFAULT_PROJECT:
        parts.append(f"project={project}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _requested_target(request: BuildCreate) -> TargetRequest | None:
    """The request's target, None when it asks nothing of the worker (``{}`` included)."""
    target = request.target
    return None if target is None or target.any_worker else target


def build_public(row: BuildRow) -> BuildPublic:
    request = BuildCreate.model_validate(row.request)
    error = (
        ErrorInfo(code=row.error_code, message=row.error_message or "", hint=row.error_hint or "")
        if row.error_code
        else None
    )
    artifact = (
        ArtifactInfo(
            filename=row.artifact_filename or "artifact",
            sha256=row.artifact_sha256,
            size_bytes=row.artifact_size_bytes or 0,
            backend=row.backend,
        )
        if row.artifact_sha256
        else None
    )
    base = f"/v1/builds/{row.id}"
    links = {"self": base, "events": f"{base}/events", "logs": f"{base}/logs"}
    if artifact is not None:
        links |= {"artifact": f"{base}/artifact", "metadata": f"{base}/artifact/metadata"}
    if row.report_sha256:
        links |= {"report": f"{base}/report", "report_html": f"{base}/report?format=html"}
    if row.table_id:
        links["table"] = f"/v1/calibration-tables/{row.table_id}"
    if request.sensitivity is not None or row.sensitivity_build_id:
        links["sensitivity"] = f"{base}/sensitivity"
    return BuildPublic(
        id=row.id,
        status=BuildStatus(row.status),
        stage=Stage(row.stage) if row.stage else None,
        progress=row.progress,
        model_id=row.model_id,
        dataset_id=row.dataset_id,
        table_id=row.table_id,
        table_from_cache=row.table_from_cache,
        spec=request.spec,
        calibration=request.calibration,
        benchmark=request.benchmark,
        accuracy=request.accuracy,
        eval_dataset_id=request.eval_dataset_id,
        accuracy_budget=request.accuracy_budget,
        labels=len(request.labels) if request.labels is not None else None,
        sensitivity=request.sensitivity,
        requested_backend=row.requested_backend,
        requested_target=(
            None
            if row.requested_target is None
            else TargetRequest.model_validate(row.requested_target)
        ),
        worker_id=row.worker_id,
        backend=row.backend or None,
        backend_version=row.backend_version or None,
        compute_capability=row.compute_capability or None,
        cache_key=row.cache_key,
        attempts=row.job.attempts if row.job is not None else 0,
        cancel_requested=row.cancel_requested,
        stage_seconds={k: float(v) for k, v in row.stage_seconds.items()},
        error=error,
        artifact=artifact,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        project=row.project,
        links=links,
    )


def get_build(session: Session, build_id: str, project: str | None = None) -> BuildRow:
    row = visible(session.get(BuildRow, build_id), project)
    if row is None:
        raise NotFoundError(
            f"No build with id {build_id!r}.",
            hint="List builds with GET /v1/builds.",
            field="build_id",
        )
    return row


def _check_request(
    session: Session, storage: Storage, request: BuildCreate, project: str | None
) -> str:
    """Refuse requests that cannot build, before anything is queued; the build's project."""
    from core.onnxio import load_onnx
    from engines.build import validate_keep_patterns, validate_profiles

    model = get_model(session, request.model_id, project=project)
    # the dataset (and table) of the model's project: for an admin (project None) too
    dataset = get_dataset(session, request.dataset_id, project=model.project)
    if request.table_id is not None:
        table = get_table(session, request.table_id, project=model.project)
        if table.model_id != model.id:
            raise ConflictError(
                f"Calibration table {table.id[:12]} belongs to model {table.model_id[:12]}, "
                f"not to {model.id[:12]}.",
                hint="Use a table of this model (GET /v1/calibration-tables?model_id=...).",
                field="table_id",
            )
    onnx_model = load_onnx(model_path(storage, model), load_external_data=False)
    from core.tensors import model_input_specs

    inputs = model_input_specs(onnx_model)
    validate_profiles(inputs, dict(request.spec.profiles))
    validate_keep_patterns(onnx_model, request.spec)
    _check_dataset_names(dataset, model, [s.name for s in inputs])
    check_evaluation(session, request, model, dataset, inputs)
    return model.project


def _check_dataset_names(dataset: DatasetRow, model: ModelRow, names: list[str]) -> None:
    if dataset.model_id == model.id:
        return  # validated against this model at upload
    have = sorted(str(t["name"]) for t in dataset.inputs)
    if sorted(names) == have or (len(names) == 1 and len(have) == 1):
        return
    raise DatasetError(
        f"Dataset {dataset.id[:12]} has inputs {', '.join(have)}; the model needs "
        f"{', '.join(sorted(names))}.",
        hint="Upload a dataset with one array per model input, named after it.",
        field="dataset_id",
    )


def _check_target(queue: JobQueue, requested: BackendName, target: TargetRequest | None) -> None:
    """Refuse a request no live worker could ever build (its backend, and its target: GPU,
    TensorRT version, labels); with no live worker at all the build waits (workers may start
    later: ``serve --workers 0`` plus ``trtforge worker`` elsewhere)."""
    if target is not None and target.tensorrt is not None and not version_requestable(requested):
        raise NoTargetError(
            f"A build for backend {requested.value!r} cannot ask for TensorRT {target.tensorrt}.",
            hint="Ask for backend tensorrt (or auto), or leave out target.tensorrt.",
            field="target.tensorrt",
        )
    live = queue.workers()
    if not live or any(serving_target(requested, target, w.targets, w.labels) for w in live):
        return
    offered = dict.fromkeys(describe_worker(w.targets, w.labels) for w in live)
    backend_served = any(choose_target(requested, w.targets) for w in live)
    asked = f"backend {requested.value!r}" + (f" and {target}" if target is not None else "")
    raise NoTargetError(
        f"No live worker builds for {asked}; the live workers build for: {'; '.join(offered)}.",
        field="target" if backend_served else "spec.backend",
    )


def submit_build(
    session: Session,
    storage: Storage,
    queue: JobQueue,
    request: BuildCreate,
    project: str | None = None,
) -> tuple[BuildRow, bool]:
    """Queue a build of models and datasets of ``project`` (None: any, the build joins its
    model's); (existing build, False) when one with the same cache key exists.

    A failed or cancelled build with the same key is queued again and counts as new.
    """
    try:
        home = _check_request(session, storage, request, project)
    except ModelError:
        _refuse_if_deleted(session, storage, request)
        raise
    requested = request.spec.backend
    target = _requested_target(request)
    _check_target(queue, requested, target)
    key = build_cache_key(request, home)
    existing = session.scalar(select(BuildRow).where(BuildRow.cache_key == key))
    if existing is not None:
        if BuildStatus(existing.status) not in (BuildStatus.FAILED, BuildStatus.CANCELLED):
            return existing, False
        reset_for_retry(existing)
        queue.enqueue(session, existing.id)
        add_log(session, existing.id, "Submitted again: queued for a new run.")
        try:
            session.commit()
        except (IntegrityError, StaleDataError) as exc:  # deleted meanwhile
            session.rollback()
            raise ConflictError(
                f"Build {existing.id[:12]} was deleted while it was submitted again.",
                hint="Submit the request again: it makes a new build.",
            ) from exc
        return existing, True
    row = BuildRow(
        id=uuid.uuid4().hex,
        project=home,
        cache_key=key,
        model_id=request.model_id,
        dataset_id=request.dataset_id,
        eval_dataset_id=request.eval_dataset_id,
        table_id=request.table_id,
        request=request.model_dump(mode="json"),
        spec_digest=request.spec.digest,
        requested_backend=requested.value,
        requested_target=None if target is None else target.model_dump(mode="json"),
        backend="",
        backend_version="",
        compute_capability="",
        status=BuildStatus.QUEUED.value,
        progress=0.0,
        cancel_requested=False,
        stage_seconds={},
    )
    try:
        session.add(row)
        session.flush()
        queue.enqueue(session, row.id)
        add_log(
            session,
            row.id,
            f"Queued for a worker that builds {requested.value}"
            + (f" ({target})." if target is not None else "."),
        )
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        winner = session.scalar(select(BuildRow).where(BuildRow.cache_key == key))
        if winner is not None:  # the same request raced us in
            return winner, False
        raise ConflictError(  # a foreign key: its model, dataset or table was deleted meanwhile
            "The model, dataset or calibration table of this build was deleted while it was "
            "submitted.",
            hint="Upload it again (or pick another), then resubmit.",
        ) from exc
    return row, True


def _refuse_if_deleted(session: Session, storage: Storage, request: BuildCreate) -> None:
    """Raise :class:`ConflictError` when the model vanished while the request was checked (its
    files are removed right after its row): a deletion raced the submission."""
    session.rollback()  # read afresh
    model = session.get(ModelRow, request.model_id)
    if model is None or not model_path(storage, model).is_file():
        raise ConflictError(
            f"Model {request.model_id[:12]} was deleted while this build was submitted.",
            hint="Upload the model again, then resubmit.",
            field="model_id",
        )


def list_builds(
    session: Session,
    limit: int,
    offset: int,
    *,
    model_id: str | None = None,
    status: BuildStatus | None = None,
    project: str | None = None,
    model_name: str | None = None,
    model_tags: Sequence[str] = (),
    precision: Precision | None = None,
    backend: BackendName | None = None,
) -> Page[BuildRow]:
    """Builds, newest first; ``model_name``/``model_tags`` filter by their model's name or file
    name and tags (:func:`naming.filter_named`), ``backend`` by the backend built for or asked
    for."""
    query = select(BuildRow)
    if project is not None:
        query = query.where(BuildRow.project == project)
    if model_id is not None:
        query = query.where(BuildRow.model_id == model_id)
    if status is not None:
        query = query.where(BuildRow.status == status.value)
    if model_name or model_tags:
        models = filter_named(
            select(ModelRow.id),
            ModelRow.name,
            ModelRow.filename,
            ModelRow.tags,
            name=model_name,
            tags=model_tags,
        )
        query = query.where(BuildRow.model_id.in_(models))
    if precision is not None:
        query = query.where(BuildRow.request["spec"]["precision"].as_string() == precision.value)
    if backend is not None:
        query = query.where(
            or_(BuildRow.backend == backend.value, BuildRow.requested_backend == backend.value)
        )
    return newest_first(session, query, BuildRow, limit, offset, load=[selectinload(BuildRow.job)])


def cancel_build(
    session: Session, queue: JobQueue, build_id: str, project: str | None = None
) -> BuildRow:
    """Cancel now (queued: its job withdrawn from ``queue`` in the same transaction) or at the
    next stage boundary (running). Idempotent once ended."""
    row = get_build(session, build_id, project)
    status = BuildStatus(row.status)
    if status.terminal:
        if status is BuildStatus.CANCELLED:
            return row
        raise ConflictError(
            f"Build {build_id[:12]} already ended ({status.value}); there is nothing to cancel.",
            hint="Delete it if it is no longer needed: DELETE /v1/builds/{id}, or "
            "trtforge builds delete ID.",
        )
    row.cancel_requested = True
    job = row.job
    if status is BuildStatus.QUEUED and job is not None and job.state == JobState.QUEUED.value:
        queue.withdraw(session, row.id)
        row.status = BuildStatus.CANCELLED.value
        row.finished_at = utcnow()
        add_log(session, row.id, "Build cancelled before it started.", level="warning")
    else:
        add_log(session, row.id, "Cancel requested: stopping at the next stage boundary.")
    session.commit()
    return row


def delete_build(
    session: Session, storage: Storage, build_id: str, project: str | None = None
) -> None:
    """Delete an ended build with its logs, and its artifact and report unless another row
    references the same bytes (in any project: blobs are shared, references counted)."""
    row = get_build(session, build_id, project)
    if not BuildStatus(row.status).terminal:
        raise ConflictError(
            f"Build {build_id[:12]} is {row.status}; only ended builds can be deleted.",
            hint="Cancel it first (POST /v1/builds/{id}/cancel).",
        )
    blobs = [sha for sha in (row.artifact_sha256, row.report_sha256) if sha]
    terminal = [s.value for s in BuildStatus if s.terminal]
    session.expunge(row)
    session.execute(delete(BuildLogRow).where(BuildLogRow.build_id == build_id))
    session.execute(delete(JobRow).where(JobRow.build_id == build_id))
    # only while it is still ended: a submission may have queued it again since it was read
    gone = cast(
        "CursorResult[Any]",
        session.execute(
            delete(BuildRow).where(BuildRow.id == build_id, BuildRow.status.in_(terminal))
        ),
    )
    if gone.rowcount != 1:
        session.rollback()
        raise ConflictError(
            f"Build {build_id[:12]} was submitted again while it was being deleted.",
            hint="Cancel it first (POST /v1/builds/{id}/cancel), then delete it.",
        )
    commit_and_release(session, storage, blobs)


def link_build_files(
    session: Session,
    storage: Storage,
    build_id: str,
    *,
    artifact: Path,
    artifact_sha256: str,
    artifact_filename: str,
    artifact_metadata: dict[str, Any],
    report: Path,
) -> dict[str, Any]:
    """Store a build's artifact and report as blobs and link the build row to them, in one
    transaction under the blobs' locks (:mod:`service.store.blobs`); both files are moved away.
    Returns the columns it set (for :meth:`~service.worker.recorder.BuildRecorder.succeed`)."""
    try:
        report_sha = storage.hash_file(report)
        files = {artifact_sha256: artifact, report_sha: report}
        # locked in sha order, as deleters lock them: no lock cycle
        stored = {sha: place_blob(session, storage, files[sha], sha) for sha in sorted(files)}
        linked: dict[str, Any] = {
            "artifact_sha256": artifact_sha256,
            "artifact_filename": artifact_filename,
            "artifact_size_bytes": stored[artifact_sha256].size_bytes,
            "artifact_metadata": artifact_metadata,
            "report_sha256": report_sha,
        }
        build = session.get_one(BuildRow, build_id)
        for column, value in linked.items():
            setattr(build, column, value)
        session.commit()
    except BaseException:
        session.rollback()
        artifact.unlink(missing_ok=True)
        report.unlink(missing_ok=True)
        raise
    return linked


def log_lines(session: Session, build_id: str, after: int = 0, limit: int = 1000) -> list[LogLine]:
    """Log lines of a build with sequence number above ``after``."""
    rows = session.scalars(
        select(BuildLogRow)
        .where(BuildLogRow.build_id == build_id, BuildLogRow.id > after)
        .order_by(BuildLogRow.id)
        .limit(limit)
    )
    return [
        LogLine(seq=r.id, at=r.at, level=r.level, stage=r.stage, message=r.message) for r in rows
    ]
