"""One build: calibrate -> build -> benchmark -> compare -> report.

Runs in the build's own child process (:mod:`service.worker.runner`), recording stage, progress
and log lines through :class:`~service.worker.recorder.BuildRecorder`. A cancel request is honoured at
every stage boundary. Scratch files live in the build's work folder, which is removed whatever
happens; the artifact, report and calibration table are published as content-addressed blobs,
and the build row is linked to them in the transaction that stores them, under the blobs' locks
(:mod:`service.store.blobs`), so deleting a build with the same bytes cannot remove them.

The stages themselves are :class:`engines.workflow.Workflow`'s (the same flow as ``trtforge
build`` and sweeps); this module feeds it the build's rows and blobs: the dataset opened with the
server's archive limits, the table cache (:class:`_ServiceTables`, keyed by sha256(model) +
sha256(calibration samples) + method + params + collector version), and the recorder. A table
given in the request is used as it is.
"""

from __future__ import annotations

import logging
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import TrtforgeError
from service.db import Database
from service.db.models import BuildRow, DatasetRow, ModelRow, TableRow, utcnow
from service.errors import BuildCancelledError, InsufficientStorageError
from service.hints import rest_hint
from service.schemas import (
    ArtifactInfo,
    BuildCreate,
    BuildReport,
    BuildStatus,
    CalibrationSummary,
    Stage,
    TablePublic,
)
from service.settings import Settings
from service.store.builds import link_build_files
from service.store.catalog import dataset_path, load_table, model_path, store_table, table_public
from service.store.storage import Storage, is_disk_full
from service.worker.limits import allocation_failed, memory_limit_bytes, resource_limit_failure
from service.worker.measures import (
    EvalDataset,
    eval_dataset_of,
    open_dataset,
    open_eval_dataset,
    rank_nodes,
    request_labels,
    search_budget,
)
from service.worker.recorder import BuildRecorder, RecorderBase

if TYPE_CHECKING:
    from calibrators.data import CalibrationDataset
    from calibrators.table import CalibrationTable
    from engines.workflow import Calibration

__all__ = ["BuildPlan", "BuildStore", "LocalStore", "execute", "run_build"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build needs, read from the database once at the start."""

    build_id: str
    request: BuildCreate
    backend: str
    model_id: str
    model_filename: str
    model_path: Path
    dataset_id: str
    dataset_filename: str
    dataset_path: Path
    preprocess: dict[str, object] | None
    input_name: str | None
    eval_dataset: EvalDataset | None = None
    """The request's separate evaluation dataset (``eval_dataset_id``)."""

    def artifact_filename(self, suffix: str) -> str:
        """``<model stem>-<precision>-<build id prefix><suffix>``."""
        stem = Path(self.model_filename).stem or "model"
        return f"{stem}-{self.request.spec.precision.value}-{self.build_id[:8]}{suffix}"


def load_plan(db: Database, storage: Storage, build_id: str) -> BuildPlan:
    with db.session() as session:
        build = session.get_one(BuildRow, build_id)
        model = session.get_one(ModelRow, build.model_id)
        dataset = session.get_one(DatasetRow, build.dataset_id)
        evaluation = None
        if build.eval_dataset_id is not None:
            evaluation = session.get(DatasetRow, build.eval_dataset_id)
        return BuildPlan(
            build_id=build.id,
            request=BuildCreate.model_validate(build.request),
            backend=build.backend,
            model_id=model.id,
            model_filename=model.filename,
            model_path=model_path(storage, model),
            dataset_id=dataset.id,
            dataset_filename=dataset.filename,
            dataset_path=dataset_path(storage, dataset),
            preprocess=dataset.preprocess,
            input_name=dataset.input_name,
            eval_dataset=eval_dataset_of(storage, evaluation),
        )


class BuildStore(Protocol):
    """Where a build's tables come from and its results go: the service's database and storage
    (:class:`LocalStore`), or the API, for a worker on another machine
    (:class:`service.worker.remote_build.RemoteStore`)."""

    def lookup(self, key: str) -> CalibrationTable | None:
        """The table cached under ``key`` (the workflow's table cache), or None."""
        ...

    def store(self, key: str, table: CalibrationTable) -> None:
        """Cache ``table`` under ``key``."""
        ...

    def given_table(self, table_id: str) -> CalibrationTable:
        """A stored table the request names."""
        ...

    def table_info(self, table_id: str) -> TablePublic:
        """A stored table's record (for the report's calibration summary)."""
        ...

    def publish(
        self,
        *,
        artifact: Path,
        artifact_sha256: str,
        artifact_filename: str,
        artifact_metadata: dict[str, Any],
        report: Path,
    ) -> dict[str, Any]:
        """Store the artifact and report and link the build to them; the build columns set."""
        ...


def run_build(
    build_id: str, *, db: Database, storage: Storage, settings: Settings, attempt: int | None = None
) -> BuildStatus:
    """Run a build to a terminal status (recorded in the database), and return that status."""

    def prepare() -> tuple[BuildPlan, BuildStore]:
        plan = load_plan(db, storage, build_id)
        return plan, LocalStore(plan, db, storage)

    recorder = BuildRecorder(db, build_id, data_dir=settings.data_dir)
    work = storage.work_dir(build_id)
    return execute(recorder, prepare, work=work, settings=settings, attempt=attempt)


def execute(
    recorder: RecorderBase,
    prepare: Callable[[], tuple[BuildPlan, BuildStore]],
    *,
    work: Path,
    settings: Settings,
    attempt: int | None = None,
) -> BuildStatus:
    """Run a build to a terminal status, recorded through ``recorder``: ``prepare`` reads its
    plan and opens its store; every failure is recorded (never raised), ``work`` is removed."""
    build_id = recorder.build_id
    shutil.rmtree(work, ignore_errors=True)  # leftovers of an interrupted attempt
    work.mkdir(parents=True)
    try:
        plan, store = prepare()
        recorder.start(attempt)
        return _run_stages(plan, recorder, work, store, settings)
    except BuildCancelledError:
        recorder.cancelled()
        return BuildStatus.CANCELLED
    except TrtforgeError as exc:
        code, message, hint = exc.code, exc.message, exc.hint
        if allocation_failed(message):  # recorded as such at once, not rewritten afterwards
            code, message, hint = resource_limit_failure(message, memory_limit_bytes(settings))
        recorder.fail(code, message, rest_hint(hint), details=getattr(exc, "log", "") or "")
        return BuildStatus.FAILED
    except Exception as exc:
        if is_disk_full(exc):  # not a bug: the disk (or the database's) is full
            full = InsufficientStorageError(
                f"The server's disk filled up during the build: {type(exc).__name__}."
            )
            recorder.fail(full.code, full.message, full.hint, details=traceback.format_exc())
            return BuildStatus.FAILED
        log.exception("build %s crashed", build_id)
        recorder.fail(
            "internal_error",
            f"The build crashed: {type(exc).__name__}: {exc}",
            "This is a trtforge bug; the build log holds the traceback.",
            details=traceback.format_exc(),
        )
        return BuildStatus.FAILED
    finally:
        shutil.rmtree(work, ignore_errors=True)


class LocalStore:
    """:class:`BuildStore` on the service's database and storage: calibration tables stored as
    blobs with a row each; artifact and report published as blobs linked to the build row."""

    def __init__(self, plan: BuildPlan, db: Database, storage: Storage) -> None:
        self._plan, self._db, self._storage = plan, db, storage

    def lookup(self, key: str) -> CalibrationTable | None:
        with self._db.session() as session:
            row = session.get(TableRow, key)
            return load_table(self._storage, row) if row is not None else None

    def store(self, key: str, table: CalibrationTable) -> None:
        with self._db.session() as session:
            store_table(
                session,
                self._storage,
                key=key,
                model_id=self._plan.model_id,
                dataset_id=self._plan.dataset_id,
                table=table,
                source="calibrated",
                missing=[],
            )

    def given_table(self, table_id: str) -> CalibrationTable:
        with self._db.session() as session:
            return load_table(self._storage, session.get_one(TableRow, table_id))

    def table_info(self, table_id: str) -> TablePublic:
        with self._db.session() as session:
            return table_public(session.get_one(TableRow, table_id))

    def publish(
        self,
        *,
        artifact: Path,
        artifact_sha256: str,
        artifact_filename: str,
        artifact_metadata: dict[str, Any],
        report: Path,
    ) -> dict[str, Any]:
        with self._db.session() as session:  # stored and linked under the blobs' locks
            return link_build_files(
                session,
                self._storage,
                self._plan.build_id,
                artifact=artifact,
                artifact_sha256=artifact_sha256,
                artifact_filename=artifact_filename,
                artifact_metadata=artifact_metadata,
                report=report,
            )


def _run_stages(
    plan: BuildPlan,
    recorder: RecorderBase,
    work: Path,
    store: BuildStore,
    settings: Settings,
) -> BuildStatus:
    from engines.gate import gate_error
    from engines.names import BackendName
    from engines.perf_report import BenchmarkOptions
    from engines.workflow import Workflow

    request = plan.request
    # the claiming worker chose the target (service.queue.claim): build for exactly that backend
    # (a build run without a queue, as in tests, resolves what it asked for here)
    chosen = BackendName(plan.backend) if plan.backend else request.spec.backend
    spec = request.spec.model_copy(update={"backend": chosen})
    flow = Workflow(
        plan.model_path,
        spec,
        recorder=recorder,
        store=store,
        model_sha256=plan.model_id,
        work_dir=work,
    )
    split = flow.split(
        _open_dataset(plan, settings),
        eval_fraction=request.accuracy.eval_fraction if request.accuracy.enabled else 0.0,
        seed=request.accuracy.seed,
        max_calibration_samples=request.calibration.max_samples,
        eval_dataset=open_eval_dataset(plan.eval_dataset, settings),
        labels=request_labels(request),
    )
    given = store.given_table(request.table_id) if request.table_id is not None else None
    calibration = flow.calibrate(
        split.calibration,
        table=given,
        held_out=split.evaluation if split.held_out else None,
        batch_size=request.calibration.batch_size,
    )
    summary = None
    if calibration is not None:
        summary = _summary(calibration.key or request.table_id, calibration, store, recorder)
    filename = plan.artifact_filename(flow.artifact_suffix)
    mixed = search_budget(flow, calibration, split, request)
    artifact = flow.build(
        work / filename,
        calibration.table if calibration else None,
        spec=mixed.apply_to(flow.spec) if mixed is not None else None,
    )
    perf = flow.benchmark(
        artifact,
        split.evaluation,
        BenchmarkOptions(**request.benchmark.model_dump(exclude_none=True)),
    )
    accuracy = gate = None
    if request.accuracy.enabled:
        accuracy = flow.evaluate(
            artifact,
            split.evaluation,
            max_samples=request.accuracy.max_samples,
            labels=split.eval_labels,
        )
        gate = flow.gate(accuracy)
    else:
        recorder.skip(
            Stage.EVALUATE,
            "accuracy check disabled in the request: the accuracy gate is not checked",
        )
    sensitivity = rank_nodes(flow, calibration, split, request)
    recorder.check_cancel()
    info = ArtifactInfo(
        filename=filename,
        sha256=artifact.metadata.sha256,
        size_bytes=artifact.path.stat().st_size,
        backend=artifact.metadata.backend,
    )
    report = BuildReport(
        build_id=plan.build_id,
        created_at=utcnow(),
        model={"id": plan.model_id, "filename": plan.model_filename},
        dataset={
            "id": plan.dataset_id,
            "filename": plan.dataset_filename,
            "num_samples": split.total,
            "calibration_samples": len(split.calibration),
            "evaluation_samples": len(split.evaluation),
        },
        spec=request.spec,
        calibration=summary,
        smoothing=calibration.smoothing if calibration else None,
        bias_correction=flow.bias_correction,
        artifact=info,
        artifact_metadata=artifact.metadata,
        quantized_nodes=list(artifact.metadata.quantized_nodes),
        kept_nodes=(
            mixed.label_kept_nodes(artifact.metadata.kept_nodes)
            if mixed is not None
            else dict(artifact.metadata.kept_nodes)
        ),
        performance=perf,
        accuracy=accuracy,
        gate=gate,
        mixed_precision=mixed,
        sensitivity=sensitivity,
        environment=dict(perf.environment),
        stage_seconds=dict(recorder.stage_seconds),
    )
    report_path = work / "trtforge-report.json"
    report_path.write_bytes(report.model_dump_json(indent=2).encode("utf-8"))
    published = store.publish(
        artifact=artifact.path,
        artifact_sha256=info.sha256,
        artifact_filename=info.filename,
        artifact_metadata=artifact.metadata.model_dump(mode="json"),
        report=report_path,
    )
    if gate is not None and not gate.passed:
        error = gate_error(gate, request.spec.precision)
        recorder.fail(error.code, error.message, rest_hint(error.hint), **published)
        return BuildStatus.FAILED
    recorder.succeed(**published)
    return BuildStatus.SUCCEEDED


def _open_dataset(plan: BuildPlan, settings: Settings) -> CalibrationDataset:
    return open_dataset(plan.dataset_path, plan.preprocess, plan.input_name, settings)


def _summary(
    key: str | None, calibration: Calibration, store: BuildStore, recorder: RecorderBase
) -> CalibrationSummary:
    """The report's calibration summary, from the table the workflow used or stored."""
    if key is None:
        raise ValueError("a calibrated build has a table key")
    row = store.table_info(key)
    summary = CalibrationSummary(
        table_id=row.id,
        from_cache=calibration.from_cache,
        source=row.source,
        method=row.method,
        samples=row.samples,
        num_tensors=row.num_tensors,
    )
    recorder.set_table(row.id, calibration.from_cache)
    return summary
