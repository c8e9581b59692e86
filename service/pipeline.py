"""One build: calibrate -> build -> benchmark -> compare -> report.

Runs in the build's own child process (:mod:`service.jobs.runner`), recording stage, progress
and log lines through :class:`~service.recorder.BuildRecorder`. A cancel request is honoured at
every stage boundary. Scratch files live in the build's work folder, which is removed whatever
happens; the artifact, report and calibration table are published as content-addressed blobs,
and the build row is linked to them only once they are in place.

- calibrate (INT8 precisions): the table key is sha256(model) + sha256(calibration samples) +
  method + params + collector version; a table stored under it is reused, otherwise one is
  computed and stored. A table given in the request is used as it is.
- build: :func:`engines.build.build_artifact` writes the artifact and its metadata sidecar.
- benchmark: :func:`engines.benchmark.benchmark` on the held-out samples.
- evaluate: :func:`engines.accuracy.compare` against the FP32 model on the held-out samples.
"""

from __future__ import annotations

import logging
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrators.errors import TrtforgeError
from service.catalog import dataset_path, load_table, model_path, store_table
from service.db import Database
from service.db.models import BuildRow, DatasetRow, ModelRow, TableRow, utcnow
from service.errors import BuildCancelledError
from service.recorder import BuildRecorder
from service.schemas import (
    ArtifactInfo,
    BuildCreate,
    BuildReport,
    BuildStatus,
    CalibrationSummary,
    Stage,
)
from service.settings import Settings
from service.storage import Storage

if TYPE_CHECKING:
    from calibrators.data import CalibrationDataset
    from calibrators.table import CalibrationTable
    from engines.accuracy import AccuracyReport
    from engines.backends.base import Artifact
    from engines.benchmark import PerfReport

__all__ = ["BuildPlan", "run_build"]

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

    @property
    def artifact_filename(self) -> str:
        stem = Path(self.model_filename).stem or "model"
        suffix = ".engine" if self.backend == "tensorrt" else ".onnx"
        return f"{stem}-{self.request.spec.precision.value}-{self.build_id[:8]}{suffix}"


@dataclass(frozen=True)
class _Data:
    calibration: CalibrationDataset
    evaluation: CalibrationDataset
    total: int


@dataclass(frozen=True)
class _TableChoice:
    table: CalibrationTable
    summary: CalibrationSummary


def load_plan(db: Database, storage: Storage, build_id: str) -> BuildPlan:
    with db.session() as session:
        build = session.get_one(BuildRow, build_id)
        model = session.get_one(ModelRow, build.model_id)
        dataset = session.get_one(DatasetRow, build.dataset_id)
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
        )


def run_build(
    build_id: str, *, db: Database, storage: Storage, settings: Settings, attempt: int | None = None
) -> BuildStatus:
    """Run a build to a terminal status (recorded in the database), and return that status."""
    recorder = BuildRecorder(db, build_id)
    work = storage.work_dir(build_id)
    shutil.rmtree(work, ignore_errors=True)  # leftovers of an interrupted attempt
    work.mkdir(parents=True)
    try:
        plan = load_plan(db, storage, build_id)
        recorder.start(attempt)
        _run_stages(plan, recorder, work, db, storage, settings)
        return BuildStatus.SUCCEEDED
    except BuildCancelledError:
        recorder.cancelled()
        return BuildStatus.CANCELLED
    except TrtforgeError as exc:
        recorder.fail(exc.code, exc.message, exc.hint, details=getattr(exc, "log", "") or "")
        return BuildStatus.FAILED
    except Exception as exc:
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


def _run_stages(
    plan: BuildPlan,
    recorder: BuildRecorder,
    work: Path,
    db: Database,
    storage: Storage,
    settings: Settings,
) -> None:
    data = _open_data(plan, settings, recorder)
    choice = _calibrate(plan, data, recorder, db, storage)
    artifact = _build(plan, choice, recorder, work)
    perf = _benchmark(plan, data, artifact, recorder)
    accuracy = _evaluate(plan, data, artifact, recorder)
    recorder.check_cancel()
    artifact_blob = storage.adopt_blob(artifact.path, artifact.metadata.sha256)
    info = ArtifactInfo(
        filename=plan.artifact_filename,
        sha256=artifact_blob.sha256,
        size_bytes=artifact_blob.size_bytes,
        backend=artifact.metadata.backend,
    )
    report = BuildReport(
        build_id=plan.build_id,
        created_at=utcnow(),
        model={"id": plan.model_id, "filename": plan.model_filename},
        dataset={
            "id": plan.dataset_id,
            "filename": plan.dataset_filename,
            "num_samples": data.total,
            "calibration_samples": len(data.calibration),
            "evaluation_samples": len(data.evaluation),
        },
        spec=plan.request.spec,
        calibration=choice.summary if choice is not None else None,
        artifact=info,
        artifact_metadata=artifact.metadata,
        quantized_nodes=list(artifact.metadata.quantized_nodes),
        kept_nodes=dict(artifact.metadata.kept_nodes),
        performance=perf,
        accuracy=accuracy,
        environment=dict(perf.environment),
        stage_seconds=dict(recorder.stage_seconds),
    )
    report_blob = storage.put_bytes(report.model_dump_json(indent=2).encode("utf-8"))
    recorder.succeed(
        artifact_sha256=info.sha256,
        artifact_filename=info.filename,
        artifact_size_bytes=info.size_bytes,
        artifact_metadata=artifact.metadata.model_dump(mode="json"),
        report_sha256=report_blob.sha256,
    )


def _open_data(plan: BuildPlan, settings: Settings, recorder: BuildRecorder) -> _Data:
    from calibrators.archive import ArchiveLimits
    from calibrators.data import CalibrationDataset, PreprocessSpec, model_input_specs
    from calibrators.onnxio import load_onnx

    limits = ArchiveLimits(
        max_members=settings.max_archive_members,
        max_total_bytes=settings.max_archive_bytes,
        max_member_bytes=settings.max_archive_member_bytes,
    )
    preprocess = PreprocessSpec.model_validate(plan.preprocess) if plan.preprocess else None
    inputs = model_input_specs(load_onnx(plan.model_path, load_external_data=False))
    dataset = CalibrationDataset.open(
        plan.dataset_path, preprocess=preprocess, limits=limits, input_name=plan.input_name
    ).validate(inputs)
    options = plan.request.accuracy
    if options.enabled and options.eval_fraction > 0 and len(dataset) >= 2:
        calibration, evaluation = dataset.split(options.eval_fraction, seed=options.seed)
    else:
        calibration = evaluation = dataset
        if options.enabled:
            recorder.log("Evaluating on the calibration samples (no held-out split).")
    limit = plan.request.calibration.max_samples
    if limit is not None and limit < len(calibration):
        calibration = calibration.subset(list(range(limit)))
    recorder.log(
        f"Dataset: {len(dataset)} samples; {len(calibration)} for calibration, "
        f"{len(evaluation)} held out for benchmark and evaluation."
    )
    return _Data(calibration=calibration, evaluation=evaluation, total=len(dataset))


def _calibrate(
    plan: BuildPlan, data: _Data, recorder: BuildRecorder, db: Database, storage: Storage
) -> _TableChoice | None:
    spec = plan.request.spec
    if plan.request.table_id is None and not spec.precision.uses_int8:
        recorder.skip(Stage.CALIBRATE, f"precision {spec.precision.value} needs no INT8 ranges")
        return None
    from calibrators.calibrate import calibrate, table_cache_key

    with recorder.stage(Stage.CALIBRATE) as progress:
        if plan.request.table_id is not None:
            key, from_cache = plan.request.table_id, True
        else:
            key = table_cache_key(
                plan.model_id, data.calibration.digest, spec.calibration, spec.histogram
            )
            with db.session() as session:
                from_cache = session.get(TableRow, key) is not None
        if not from_cache:
            table = calibrate(
                plan.model_path,
                data.calibration,
                spec.calibration,
                histogram=spec.histogram,
                batch_size=plan.request.calibration.batch_size,
                progress=progress.samples,
            )
            table = table.model_copy(update={"model_sha256": plan.model_id})
            with db.session() as session:
                row, _created = store_table(
                    session,
                    storage,
                    key=key,
                    model_id=plan.model_id,
                    dataset_id=plan.dataset_id,
                    table=table,
                    source="calibrated",
                    missing=[],
                )
        with db.session() as session:
            row = session.get_one(TableRow, key)
            table = load_table(storage, row)
            summary = CalibrationSummary(
                table_id=row.id,
                from_cache=from_cache,
                source=row.source,
                method=row.method,
                samples=row.samples,
                num_tensors=row.num_tensors,
            )
        recorder.set_table(row.id, from_cache)
        recorder.log(
            f"Calibration table {row.id[:12]}: {row.num_tensors} tensors"
            + (" (reused from the cache)." if from_cache else f" from {row.samples} samples."),
            stage=Stage.CALIBRATE,
        )
    return _TableChoice(table=table, summary=summary)


def _build(
    plan: BuildPlan, choice: _TableChoice | None, recorder: BuildRecorder, work: Path
) -> Artifact:
    from engines.build import build_artifact

    with recorder.stage(Stage.BUILD) as progress:
        artifact = build_artifact(
            plan.model_path,
            plan.request.spec,
            choice.table if choice is not None else None,
            work / plan.artifact_filename,
            progress=progress.message,
        )
        meta = artifact.metadata
        recorder.log(
            f"Built {meta.backend} {meta.backend_version} artifact ({meta.size_bytes} bytes, "
            f"{len(meta.quantized_nodes)} INT8 nodes, {len(meta.kept_nodes)} kept): "
            f"{meta.backend_reason}",
            stage=Stage.BUILD,
        )
    return artifact


def _benchmark(
    plan: BuildPlan, data: _Data, artifact: Artifact, recorder: BuildRecorder
) -> PerfReport:
    from engines.benchmark import BenchmarkOptions, benchmark
    from engines.build import select_backend

    given = plan.request.benchmark.model_dump(exclude_none=True)
    options = BenchmarkOptions(**given)
    with recorder.stage(Stage.BENCHMARK) as progress:
        backend, _reason = select_backend(plan.request.spec.backend)
        with backend.load(artifact.path) as runner:
            perf = benchmark(runner, data.evaluation, options, progress=progress.message)
        recorder.log(
            f"{perf.throughput_qps:.1f} qps, median latency {perf.latency.median_ms:.3f} ms, "
            f"p99 {perf.latency.p99_ms:.3f} ms (batch {perf.batch_size}).",
            stage=Stage.BENCHMARK,
        )
        for warning in perf.warnings:
            recorder.log(warning, level="warning", stage=Stage.BENCHMARK)
    return perf


def _evaluate(
    plan: BuildPlan, data: _Data, artifact: Artifact, recorder: BuildRecorder
) -> AccuracyReport | None:
    options = plan.request.accuracy
    if not options.enabled:
        recorder.skip(Stage.EVALUATE, "accuracy check disabled in the request")
        return None
    from engines.accuracy import compare
    from engines.backends.onnxruntime import OnnxRuntimeRunner
    from engines.build import select_backend

    with recorder.stage(Stage.EVALUATE) as progress:
        backend, _reason = select_backend(plan.request.spec.backend)
        with OnnxRuntimeRunner(plan.model_path) as reference, backend.load(artifact.path) as cand:
            report = compare(
                reference,
                cand,
                data.evaluation,
                max_samples=options.max_samples,
                progress=progress.message,
            )
        for output in report.outputs:
            recorder.log(
                f"{output.name}: cosine {output.cosine_similarity:.6f}, "
                f"SQNR {output.sqnr_db:.1f} dB, max abs error {output.max_abs_error:.4g}.",
                stage=Stage.EVALUATE,
            )
    return report
