"""One build as data flows: open -> calibrate -> build -> benchmark -> evaluate.

The service's worker (:mod:`service.worker.pipeline`), ``trtforge build``, ``trtforge sensitivity`` and
:func:`engines.sweep.sweep` all go through :class:`Workflow`, so a build is orchestrated once:

- the model is read once (without its weights) and the spec checked against it (profiles, keep
  patterns) before anything runs;
- the backend is chosen once, where the build runs (:func:`engines.backends.registry.select_backend`), and the
  same backend object builds, benchmarks and evaluates;
- the dataset is validated once and split once: calibration samples never include the held-out
  samples that benchmark and evaluation measure on;
- stages report to a :class:`Recorder` (the service's writes the build row; the CLI's draws
  progress bars; :class:`QuietRecorder` does nothing), which may stop the build between stages;
- calibration tables go through an optional :class:`TableStore` under the cache key of
  :func:`calibrators.calibrate.table_cache_key` (the service's stores them as blobs).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx

from calibrators.data import CalibrationDataset
from core.onnxio import load_onnx
from core.tensors import TensorSpec, model_input_specs
from engines.backends.registry import select_backend
from engines.build import build_artifact, validate_keep_patterns, validate_profiles
from engines.errors import SpecError
from engines.graph.prequantized import is_prequantized
from engines.spec import BuildSpec
from engines.stages import Stage

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable
    from engines.accuracy_report import AccuracyReport, MetricBudget
    from engines.backends.base import Artifact, Backend, Runner
    from engines.gate import GateResult
    from engines.graph.layer_stats import LayerStats
    from engines.mixed import MixedPrecisionResult
    from engines.names import QdqExecution
    from engines.perf_report import BenchmarkOptions, PerfReport
    from engines.techniques import BiasCorrectionReport, SmoothingReport

_INLINE_LIMIT_BYTES = 1 << 30
"""Prepared models above 1 GiB keep their weights in a file beside them (protobuf's 2 GiB cap)."""

__all__ = [
    "Calibration",
    "QuietRecorder",
    "Recorder",
    "Split",
    "StageProgress",
    "TableStore",
    "Workflow",
]

log = logging.getLogger(__name__)


class StageProgress(Protocol):
    """Progress callbacks of one running stage."""

    def samples(self, done: int, total: int) -> None:
        """``done`` of ``total`` samples processed (calibration)."""

    def message(self, message: str, done: float) -> None:
        """What the stage is doing now and the fraction done (build, benchmark, evaluation)."""


class Recorder(Protocol):
    """Where a workflow reports: stage boundaries, progress, log lines, cancellation."""

    def stage(self, stage: Stage) -> AbstractContextManager[StageProgress]:
        """Enter a stage (may raise to stop the build, e.g. when it was cancelled)."""

    def skip(self, stage: Stage, reason: str) -> None:
        """A stage that does not apply to this build."""

    def log(self, message: str, *, level: str = "info", stage: Stage | None = None) -> None:
        """One log line."""


class _NoProgress:
    def samples(self, done: int, total: int) -> None:
        return None

    def message(self, message: str, done: float) -> None:
        return None


class QuietRecorder:
    """A recorder that sends log lines to :mod:`logging` and draws nothing."""

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[StageProgress]:
        yield _NoProgress()

    def skip(self, stage: Stage, reason: str) -> None:
        log.info("%s: skipped (%s)", stage.value, reason)

    def log(self, message: str, *, level: str = "info", stage: Stage | None = None) -> None:
        log.log(logging.getLevelName(level.upper()), message)


class TableStore(Protocol):
    """A cache of calibration tables by key."""

    def lookup(self, key: str) -> CalibrationTable | None:
        """The table stored under ``key``, or None."""

    def store(self, key: str, table: CalibrationTable) -> None:
        """Keep ``table`` under ``key``."""


@dataclass(frozen=True)
class Split:
    """The samples of one build: calibration and held-out evaluation, never overlapping unless
    there is a single sample or no split was asked for (``held_out`` False)."""

    calibration: CalibrationDataset
    evaluation: CalibrationDataset
    total: int
    held_out: bool
    eval_labels: np.ndarray | None = None
    """Labels of the evaluation samples, in their order, when labels were given."""


@dataclass(frozen=True)
class Calibration:
    """The table a build uses and where it came from."""

    table: CalibrationTable
    key: str | None
    """The cache key it was computed or found under; None for a table given by the caller."""
    from_cache: bool
    given: bool
    smoothing: SmoothingReport | None = None
    """SmoothQuant / cross-layer equalization on the FP32 model before calibration."""


SMOOTHING_JUDGE_SAMPLES = 128
"""Held-out samples (else calibration samples), spread over the set, on which ``auto`` smoothing
is judged."""
SMOOTHING_MIN_GAIN_DB = 0.5
"""What ``auto`` smoothing must gain in whole-model INT8 output SQNR to be kept (it changes the
graph, sometimes with an inserted Mul)."""
_JUDGE_LIMIT_BYTES = 512 << 20
"""Larger models keep ``auto`` smoothing unjudged (both are held in memory to compare)."""


@dataclass(frozen=True)
class _CalibrationRun:
    data: CalibrationDataset
    held_out: CalibrationDataset | None
    batch_size: int | None
    threads: int | None
    memory_limit_bytes: int | None


@dataclass(frozen=True)
class _Judged:
    kept: bool
    report: SmoothingReport
    plain: Calibration
    """The plain model's table (when the smoothing is dropped, the build's)."""


def _judge_fit(probe: CalibrationDataset, run: _CalibrationRun) -> int:
    """How many samples like ``probe``'s first fit in half the calibration memory limit (the
    judge holds them all, and the outputs of two models); at least 16."""
    from calibrators.memory import DEFAULT_MEMORY_LIMIT_BYTES

    first = next(probe.subset([0]).batches(1))
    sample_bytes = max(1, sum(int(np.asarray(v).nbytes) for v in first.values()))
    budget = (run.memory_limit_bytes or DEFAULT_MEMORY_LIMIT_BYTES) // 2
    return max(16, budget // sample_bytes)


class Workflow:
    """One model and one build spec, checked once; the stages run against them.

    ``spec.backend`` is resolved here, once: :attr:`backend` builds, benchmarks and evaluates.
    """

    def __init__(
        self,
        model_path: Path,
        spec: BuildSpec,
        *,
        recorder: Recorder | None = None,
        store: TableStore | None = None,
        model_sha256: str | None = None,
        work_dir: Path | None = None,
        int8_weight_levels: int | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self._model_sha256 = model_sha256
        self._work_dir = work_dir
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.int8_model_path = self.model_path
        """The FP32 model INT8 builds start from: the model, or its smoothed and bias-corrected
        copy once :meth:`calibrate` prepared one."""
        self._stats: LayerStats | None = None
        self._plain_stats: LayerStats | None = None
        """Layer statistics of the model before smoothing (bias correction's, when the whole-model
        check drops the smoothing)."""
        self.bias_correction: BiasCorrectionReport | None = None
        """What bias correction did in the last INT8 build (None when it did not run)."""
        self.preparation: dict[str, Any] = {}
        """What the graph techniques did before the backend saw the model (the sidecar's
        ``preparation``)."""
        self.spec = spec
        self.recorder: Recorder = recorder or QuietRecorder()
        self.store = store
        model = load_onnx(self.model_path, load_external_data=False)
        self.inputs: list[TensorSpec] = model_input_specs(model)
        validate_profiles(self.inputs, spec.profiles)
        validate_keep_patterns(model, spec)
        self.prequantized = is_prequantized(model)
        """The model carries its own Q/DQ (QAT, Model Optimizer): built as it is, no table."""
        self._tensor_names = [i.name for i in model.graph.input] + [
            o for n in model.graph.node for o in n.output
        ]
        del model
        self.backend: Backend
        self.backend, self.backend_reason = select_backend(spec.backend)
        self.int8_weight_levels = int8_weight_levels or self.backend.int8_weight_levels()
        """INT8 weight levels smoothing and bias correction tune the model for: the backend's
        (127; 63 for ONNX Runtime on x86 CPUs without VNNI) unless given (127 to measure in
        TensorRT's arithmetic on such a CPU, as bench/ does)."""

    @property
    def model_sha256(self) -> str:
        """The model's identity in cache keys: given by the caller (the service's model id) or
        the sha256 of the model file."""
        if self._model_sha256 is None:
            from core.hashing import sha256_file

            self._model_sha256 = sha256_file(self.model_path)
        return self._model_sha256

    @property
    def qdq_execution(self) -> QdqExecution:
        """How Q/DQ variants that stand for this workflow's artifacts run (the smoothing judge,
        budget searches): its backend's execution at its INT8 weight levels."""
        from engines.variants import execution_for

        return execution_for(self.backend.name, self.int8_weight_levels)

    @property
    def artifact_suffix(self) -> str:
        """The file suffix of this workflow's artifacts (``.engine``, ``.onnx``)."""
        return self.backend.artifact_suffix

    # -- data ---------------------------------------------------------------------------------

    def split(
        self,
        dataset: CalibrationDataset,
        *,
        eval_fraction: float = 0.2,
        seed: int = 0,
        eval_dataset: CalibrationDataset | None = None,
        max_calibration_samples: int | None = None,
        labels: np.ndarray | None = None,
    ) -> Split:
        """Validate ``dataset`` against the model once and split it.

        With ``eval_dataset`` every sample of ``dataset`` calibrates and ``eval_dataset`` is held
        out (``labels`` then label its samples); otherwise ``eval_fraction`` of ``dataset`` is
        held out (``labels`` label ``dataset``'s samples, the held-out ones are picked out). An
        ``eval_fraction`` of 0, or a single sample, measures on the calibration samples.
        """
        data = dataset.validate(self.inputs)
        if eval_dataset is not None:
            evaluation = eval_dataset.validate(self.inputs)
            eval_labels = _checked_labels(labels, len(evaluation))
            split = Split(data, evaluation, len(data), True, eval_labels)
        elif eval_fraction > 0 and len(data) >= 2:
            cal_idx, eval_idx = data.split_indices(eval_fraction, seed=seed)
            all_labels = _checked_labels(labels, len(data))
            split = Split(
                data.subset(cal_idx),
                data.subset(eval_idx),
                len(data),
                True,
                None if all_labels is None else all_labels[np.asarray(eval_idx, dtype=np.int64)],
            )
        else:
            split = Split(data, data, len(data), False, _checked_labels(labels, len(data)))
        if max_calibration_samples is not None and max_calibration_samples < len(split.calibration):
            limited = split.calibration.subset(list(range(max_calibration_samples)))
            split = Split(limited, split.evaluation, split.total, split.held_out, split.eval_labels)
        self.recorder.log(
            f"Dataset: {split.total} samples; {len(split.calibration)} for calibration, "
            + (
                f"{len(split.evaluation)} held out for benchmark and evaluation."
                if split.held_out
                else "the same samples measured (no held-out split)."
            )
        )
        return split

    # -- calibrate ----------------------------------------------------------------------------

    def check_table(self, table: CalibrationTable) -> None:
        """Refuse a table that names no tensor of this model."""
        if table.compare_with_model(self._tensor_names).matched_tensors == 0:
            raise SpecError(
                "No tensor of the calibration table exists in the model.",
                hint="Pass the table calibrated for this model (trtforge calibrate MODEL ...).",
                field="table",
            )

    def calibrate(
        self,
        calibration: CalibrationDataset | None,
        *,
        table: CalibrationTable | None = None,
        held_out: CalibrationDataset | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
        memory_limit_bytes: int | None = None,
        force: bool = False,
    ) -> Calibration | None:
        """The INT8 table: ``table`` when given, else a stored one under the cache key, else one
        computed from ``calibration``. None when the precision needs no INT8 ranges (unless
        ``force``). ``held_out``: samples the calibration did not see (the build's evaluation
        split), on which ``auto`` smoothing is judged; without them it is judged on calibration
        samples, which favour it (its scales were fitted on them)."""
        if table is None and not (force or self.spec.precision.uses_int8):
            self.recorder.skip(
                Stage.CALIBRATE, f"precision {self.spec.precision.value} needs no INT8 ranges"
            )
            return None
        if self.prequantized:
            self.recorder.skip(
                Stage.CALIBRATE,
                "the model carries its own Q/DQ: its scales are kept, nothing is re-quantized",
            )
            return None
        if table is not None:
            self.check_table(table)
            with self.recorder.stage(Stage.CALIBRATE):
                self.recorder.log(
                    f"Calibration table given: {len(table.amax)} tensors.", stage=Stage.CALIBRATE
                )
            return Calibration(table=table, key=None, from_cache=True, given=True)
        if calibration is None:
            raise SpecError(
                f"Precision {self.spec.precision.value} needs INT8 ranges: give calibration data "
                "or a calibration table.",
                hint="Pass a dataset to calibrate on, or a calibration table.",
                field="data",
            )
        return self._calibrate(
            _CalibrationRun(calibration, held_out, batch_size, threads, memory_limit_bytes)
        )

    def _calibrate(self, run: _CalibrationRun) -> Calibration:
        from engines.spec import TechniqueMode

        with self.recorder.stage(Stage.CALIBRATE) as progress:
            stats, smoothing = self._smooth(
                run.data, run.batch_size, run.threads, run.memory_limit_bytes
            )
            calibration = self._table(run, progress.samples)
            if (
                smoothing is not None
                and smoothing.applied
                and self.spec.smoothing is TechniqueMode.AUTO
            ):
                judged = self._judge_smoothing(run, progress.samples, calibration.table, smoothing)
                if judged is not None:
                    smoothing = judged.report
                    if not judged.kept:
                        calibration, stats = judged.plain, self._plain_stats
            self._stats = stats
        return replace(calibration, smoothing=smoothing)

    def _table(
        self, run: _CalibrationRun, progress: Any
    ) -> Calibration:
        """The table of :attr:`int8_model_path` on ``run``'s data: stored under its cache key,
        else computed and stored."""
        from calibrators.calibrate import calibrate, table_cache_key

        spec = self.spec
        key = table_cache_key(
            self._int8_model_sha256(), run.data.digest, spec.calibration, spec.histogram
        )
        stored = self.store.lookup(key) if self.store is not None else None
        if stored is not None:
            self.recorder.log(
                f"Calibration table {key[:12]}: {len(stored.amax)} tensors (reused).",
                stage=Stage.CALIBRATE,
            )
            return Calibration(stored, key, from_cache=True, given=False)
        table = calibrate(
            self.int8_model_path,
            run.data,
            spec.calibration,
            histogram=spec.histogram,
            batch_size=run.batch_size,
            threads=run.threads,
            progress=progress,
            memory_limit_bytes=run.memory_limit_bytes,
        )
        table = table.model_copy(update={"model_sha256": self.model_sha256})
        if self.store is not None:
            self.store.store(key, table)
        self.recorder.log(
            f"Calibration table {key[:12]}: {len(table.amax)} tensors from "
            f"{table.samples} samples ({spec.calibration.method.value}).",
            stage=Stage.CALIBRATE,
        )
        return Calibration(table, key, from_cache=False, given=False)

    def _judge_smoothing(
        self,
        run: _CalibrationRun,
        progress: Any,
        smoothed: CalibrationTable,
        report: SmoothingReport,
    ) -> _Judged | None:
        """``auto`` smoothing, judged on the whole model: the plain model is calibrated too, and
        smoothing stays only when its INT8 output SQNR beats the plain model's by
        :data:`SMOOTHING_MIN_GAIN_DB` on the same held-out samples (per-layer gains, measured
        with min-max ranges on the rows they were fitted on, need not survive the table's
        clipping, the layers after and new inputs). None when the model is too large to
        compare in memory (smoothing stays)."""
        from engines.accuracy_report import AccuracyMetric
        from engines.spec import Precision
        from engines.techniques import ModelJudgement
        from engines.variants import VariantEvaluator

        smoothed_path = self.int8_model_path
        if load_onnx(smoothed_path).ByteSize() > _JUDGE_LIMIT_BYTES:  # not held while calibrating
            self.recorder.log(
                "Smoothing (auto) kept without the whole-model check: the model is too large "
                "to compare in memory.",
                stage=Stage.CALIBRATE,
            )
            return None
        self.int8_model_path = self.model_path
        plain = self._table(run, progress)
        probe = run.held_out if run.held_out is not None and len(run.held_out) else run.data
        where = "held-out" if probe is run.held_out else "calibration"
        count = min(SMOOTHING_JUDGE_SAMPLES, len(probe), _judge_fit(probe, run))
        spread = np.unique(np.linspace(0, len(probe) - 1, count).astype(int))
        rows = probe.subset([int(i) for i in spread])
        spec = self.spec.model_copy(update={"precision": Precision.INT8})
        execution = self.qdq_execution
        sqnr = []
        for path, table in ((smoothed_path, smoothed), (self.model_path, plain.table)):
            with VariantEvaluator(
                load_onnx(path), spec, table, rows, threads=run.threads, execution=execution
            ) as evaluator:
                sqnr.append(evaluator.value((), AccuracyMetric.SQNR_DB, None))
        kept = sqnr[0] >= sqnr[1] + SMOOTHING_MIN_GAIN_DB
        judgement = ModelJudgement(
            samples=len(rows),
            held_out=probe is run.held_out,
            sqnr_smoothed_db=round(sqnr[0], 3),
            sqnr_plain_db=round(sqnr[1], 3),
            min_gain_db=SMOOTHING_MIN_GAIN_DB,
            kept=kept,
        )
        self.recorder.log(
            f"Smoothing (auto) judged on {len(rows)} {where} samples: INT8 output SQNR "
            f"{sqnr[0]:.1f} dB smoothed vs {sqnr[1]:.1f} dB without: "
            + ("kept." if kept else f"dropped (it must gain {SMOOTHING_MIN_GAIN_DB} dB)."),
            stage=Stage.CALIBRATE,
        )
        record = self.preparation["smoothing"]
        record["judged"] = judgement.model_dump()
        if kept:
            self.int8_model_path = smoothed_path
            return _Judged(True, report.model_copy(update={"judged": judgement}), plain)
        record["smoothed"], record["inserted_mul"] = [], []
        dropped = [
            t.model_copy(
                update={
                    "applied": False,
                    "reason": "the whole INT8 model measured no better with smoothing",
                }
            )
            if t.applied
            else t
            for t in report.tensors
        ]
        return _Judged(
            False, report.model_copy(update={"judged": judgement, "tensors": dropped}), plain
        )

    # -- graph techniques around calibration (engines.graph.smoothing, engines.graph.bias) ----

    def _smooth(
        self,
        calibration: CalibrationDataset,
        batch_size: int | None,
        threads: int | None,
        memory_limit_bytes: int | None,
    ) -> tuple[LayerStats | None, SmoothingReport | None]:
        """Layer statistics (when smoothing or bias correction may run) and the smoothed FP32
        model, which becomes :attr:`int8_model_path` (the table is computed on it)."""
        from engines.spec import TechniqueMode

        spec = self.spec
        if spec.smoothing is TechniqueMode.OFF and spec.bias_correction is TechniqueMode.OFF:
            return None, None
        from engines.graph.layer_stats import collect_layer_stats

        stats = collect_layer_stats(
            self.model_path,
            calibration,
            batch_size=batch_size,
            threads=threads,
            memory_limit_bytes=memory_limit_bytes,
        )
        self._plain_stats = stats
        if spec.smoothing is TechniqueMode.OFF:
            return stats, None
        from engines.graph.smoothing import smooth

        result = smooth(
            load_onnx(self.model_path),
            stats,
            mode=spec.smoothing,
            keep=spec.keep.int8,
            quantize_attention=spec.quantize_attention,
            weight_levels=self.int8_weight_levels,
        )
        applied = result.report.applied
        self.recorder.log(
            f"Smoothing ({spec.smoothing.value}): {len(applied)} of {len(result.report.tensors)} "
            "activation(s) smoothed"
            + (f", {sum(t.inserted_mul for t in applied)} with an inserted Mul." if applied else "."),
            stage=Stage.CALIBRATE,
        )
        self.preparation["smoothing"] = {
            "mode": spec.smoothing.value,
            "smoothed": [t.tensor for t in applied],
            "inserted_mul": [t.tensor for t in applied if t.inserted_mul],
            "considered": len(result.report.tensors),
        }
        if applied:
            self.int8_model_path = self._save(result.model, "smoothed.onnx")
        return result.stats, result.report

    def int8_source(self, spec: BuildSpec, table: CalibrationTable) -> Path:
        """The model an INT8 build of ``spec`` starts from: :attr:`int8_model_path` with the
        biases of the layers ``spec`` quantizes shifted by their weights' mean error. Done per
        build, with the build's own keep rules (a budget search keeps nodes in FP32, whose
        biases must stay as they were)."""
        from engines.spec import TechniqueMode

        if self._stats is None or spec.bias_correction is TechniqueMode.OFF:
            self.bias_correction = None
            return self.int8_model_path
        from engines.graph.bias import correct_biases

        model, report = correct_biases(
            load_onnx(self.int8_model_path),
            self._stats,
            table,
            mode=spec.bias_correction,
            keep=spec.keep.int8,
            quantize_attention=spec.quantize_attention,
            weight_levels=self.int8_weight_levels,
        )
        self.bias_correction = report
        self.recorder.log(
            f"Bias correction ({spec.bias_correction.value}): {len(report.corrected)} of "
            f"{len(report.layers)} quantized layer bias(es) corrected.",
            stage=Stage.BUILD,
        )
        self.preparation["bias_correction"] = {
            "mode": spec.bias_correction.value,
            "corrected": report.corrected,
            "considered": len(report.layers),
        }
        if not report.corrected:
            return self.int8_model_path
        return self._save(model, f"bias-corrected-{spec.digest[:12]}.onnx")

    def _int8_model_sha256(self) -> str:
        """The identity of the model a table is computed on, for its cache key: the model's
        (:attr:`model_sha256`), or once it was prepared (smoothed, bias-corrected) the prepared
        copy's sha256 tied to the model's identity: the service's model ids are per project, so
        no table is reused across projects, whatever bytes the preparation produced."""
        if self.int8_model_path == self.model_path:
            return self.model_sha256
        from core.hashing import sha256_file

        prepared = sha256_file(self.int8_model_path)
        return hashlib.sha256(f"{self.model_sha256}\n{prepared}".encode()).hexdigest()

    def _save(self, model: onnx.ModelProto, name: str) -> Path:
        """Write a prepared model into the work folder (weights beside it when large)."""
        if self._work_dir is None:
            self._scratch = self._scratch or tempfile.TemporaryDirectory(prefix="trtforge-")
            self._work_dir = Path(self._scratch.name)
        folder = Path(self._work_dir) / "prepared"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        large = model.ByteSize() > _INLINE_LIMIT_BYTES
        onnx.save_model(
            model,
            path,
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            location=f"{path.stem}.data" if large else None,
        )
        return path

    def close(self) -> None:
        """Remove the scratch folder of prepared models (when the workflow made one)."""
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> Workflow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- build --------------------------------------------------------------------------------

    def search_budget(
        self,
        table: CalibrationTable,
        evaluation: CalibrationDataset,
        budget: MetricBudget,
        *,
        labels: np.ndarray | None = None,
        max_nodes: int | None = None,
        spec: BuildSpec | None = None,
    ) -> MixedPrecisionResult:
        """The fewest nodes to keep out of INT8 for ``budget``, searched on ``evaluation``."""
        from engines.mixed import search_mixed_precision

        if len(evaluation) == 0:
            raise SpecError(
                "An accuracy budget needs held-out samples to search on.",
                hint="Give more samples, or a separate evaluation set.",
                field="accuracy_budget",
            )
        with self.recorder.stage(Stage.BUILD) as progress:
            return search_mixed_precision(
                self.int8_model_path,
                table,
                spec or self.spec,
                evaluation,
                budget,
                labels=labels,
                max_nodes=max_nodes,
                execution=self.qdq_execution,
                progress=progress.message,
            )

    def build(
        self,
        out_path: Path,
        table: CalibrationTable | None,
        *,
        spec: BuildSpec | None = None,
    ) -> Artifact:
        """Build ``out_path`` (+ sidecar) with this workflow's backend. ``spec`` overrides the
        workflow's for one variant (its backend must be the same)."""
        spec = spec or self.spec
        self.preparation.pop("bias_correction", None)
        with self.recorder.stage(Stage.BUILD) as progress:
            source = self.model_path
            if spec.precision.uses_int8:
                source = self.int8_source(spec, table) if table else self.int8_model_path
            artifact = build_artifact(
                source,
                spec,
                table if spec.precision.uses_int8 else None,
                out_path,
                backend=(self.backend, self.backend_reason),
                progress=progress.message,
                checked=True,
            )
            if spec.precision.uses_int8 and (self.preparation or self.prequantized):
                artifact = self._record_preparation(artifact)
            meta = artifact.metadata
            self.recorder.log(
                f"Built {meta.backend} {meta.backend_version} artifact ({meta.size_bytes} bytes, "
                f"{len(meta.quantized_nodes)} INT8 nodes, {len(meta.kept_nodes)} kept): "
                f"{meta.backend_reason}",
                stage=Stage.BUILD,
            )
        return artifact

    def _record_preparation(self, artifact: Artifact) -> Artifact:
        """The sidecar names the model the user gave (not the prepared copy) and what was done
        to it before the backend built it."""
        from engines.artifacts import write_metadata

        preparation = dict(self.preparation)
        if self.prequantized:
            preparation["prequantized"] = "scales from the model"
        metadata = artifact.metadata.model_copy(
            update={"model_sha256": self.model_sha256, "preparation": preparation}
        )
        return write_metadata(artifact.path, metadata)

    def open(self, artifact: Artifact) -> Runner:
        """A runner for an artifact this workflow built."""
        return self.backend.load(artifact.path)

    # -- measure ------------------------------------------------------------------------------

    def benchmark(
        self, artifact: Artifact, samples: CalibrationDataset, options: BenchmarkOptions
    ) -> PerfReport:
        """Latency and throughput of ``artifact`` on ``samples``."""
        from engines.benchmark import benchmark

        with self.recorder.stage(Stage.BENCHMARK) as progress, self.open(artifact) as runner:
            perf = benchmark(runner, samples, options, progress=progress.message)
            self.recorder.log(
                f"{perf.throughput_qps:.1f} qps, median latency {perf.latency.median_ms:.3f} ms, "
                f"p99 {perf.latency.p99_ms:.3f} ms (batch {perf.batch_size}).",
                stage=Stage.BENCHMARK,
            )
            for warning in perf.warnings:
                self.recorder.log(warning, level="warning", stage=Stage.BENCHMARK)
        return perf

    def evaluate(
        self,
        artifact: Artifact,
        samples: CalibrationDataset,
        *,
        labels: np.ndarray | None = None,
        budget: MetricBudget | None = None,
        max_samples: int | None = None,
        batch_size: int = 16,
        reference: Runner | None = None,
    ) -> AccuracyReport:
        """``artifact``'s outputs against the FP32 model's on ``samples``. ``reference`` reuses an
        open FP32 runner (a sweep compares many artifacts with one)."""
        from engines.accuracy import compare
        from engines.backends.onnxruntime import OnnxRuntimeRunner

        with self.recorder.stage(Stage.EVALUATE) as progress:
            ref = reference or OnnxRuntimeRunner(self.model_path)
            try:
                with self.open(artifact) as candidate:
                    report = compare(
                        ref,
                        candidate,
                        samples,
                        max_samples=max_samples,
                        labels=labels,
                        budget=budget,
                        progress=progress.message,
                        batch_size=batch_size,
                    )
            finally:
                if reference is None:
                    ref.close()
            for output in report.outputs:
                self.recorder.log(
                    f"{output.name}: cosine {output.cosine_similarity:.6f}, "
                    f"SQNR {output.sqnr_db:.1f} dB, max abs error {output.max_abs_error:.4g}.",
                    stage=Stage.EVALUATE,
                )
        return report


    def gate(self, accuracy: AccuracyReport, *, spec: BuildSpec | None = None) -> GateResult:
        """Check ``accuracy`` against the spec's accuracy gate (the precision's default when the
        spec names none); the result says which outputs failed. The caller decides what a
        failure means (the service fails the build and keeps its artifact; the CLI exits 1)."""
        from engines.gate import evaluate_gate, resolve_gate

        spec = spec or self.spec
        result = evaluate_gate(accuracy, resolve_gate(spec.gate, spec.precision))
        if not result.gate.enabled:
            self.recorder.log("Accuracy gate: none.", stage=Stage.EVALUATE)
        elif result.passed:
            self.recorder.log(
                f"Accuracy gate ({result.gate_text}) passed on {result.samples} held-out samples.",
                stage=Stage.EVALUATE,
            )
        else:
            failures = "; ".join(str(f) for f in result.failures)
            self.recorder.log(
                f"Accuracy gate ({result.gate_text}) FAILED: {failures}.",
                level="error",
                stage=Stage.EVALUATE,
            )
        return result


def _checked_labels(labels: np.ndarray | None, count: int) -> np.ndarray | None:
    if labels is None:
        return None
    if len(labels) != count:
        raise SpecError(
            f"{len(labels)} labels for a dataset of {count} samples.",
            hint="Give one label per sample, in the dataset's order.",
            field="labels",
        )
    return labels

