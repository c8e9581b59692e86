"""What a build measures beyond the artifact, as its request asks (:mod:`service.worker.pipeline`
calls these): the separate evaluation set and labels, the accuracy budget's search, and the
per-node sensitivity. Each is the same engines call the CLI makes (``trtforge build
--eval-data/--labels/--accuracy-budget``, ``trtforge sensitivity``), fed from the build's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.stages import Stage
from service.db.models import DatasetRow
from service.schemas import BuildCreate
from service.settings import Settings
from service.store.catalog import dataset_path
from service.store.storage import Storage

if TYPE_CHECKING:
    import numpy as np

    from calibrators.data import CalibrationDataset
    from engines.mixed_report import MixedPrecisionResult
    from engines.sensitivity_report import SensitivityReport
    from engines.workflow import Calibration, Split, Workflow

__all__ = [
    "EvalDataset",
    "eval_dataset_of",
    "open_dataset",
    "open_eval_dataset",
    "rank_nodes",
    "request_labels",
    "search_budget",
]


@dataclass(frozen=True)
class EvalDataset:
    """A build's separate evaluation dataset, as its plan carries it (the file and how to read
    it; a worker on another machine fetches the file and replaces ``path``)."""

    id: str
    path: Path
    preprocess: dict[str, Any] | None
    input_name: str | None


def eval_dataset_of(storage: Storage, row: DatasetRow | None) -> EvalDataset | None:
    """The plan's view of an evaluation dataset row (None for none)."""
    if row is None:
        return None
    return EvalDataset(row.id, dataset_path(storage, row), row.preprocess, row.input_name)


def open_dataset(
    path: Path, preprocess: dict[str, Any] | None, input_name: str | None, settings: Settings
) -> CalibrationDataset:
    """A stored dataset, opened with the server's archive limits."""
    from calibrators.archive import ArchiveLimits
    from calibrators.data import CalibrationDataset
    from calibrators.spec import PreprocessSpec

    limits = ArchiveLimits(
        max_members=settings.max_archive_members,
        max_total_bytes=settings.max_archive_bytes,
        max_member_bytes=settings.max_archive_member_bytes,
        max_preprocessed_pixels=settings.max_preprocessed_pixels,
    )
    spec = PreprocessSpec.model_validate(preprocess) if preprocess else None
    return CalibrationDataset.open(path, preprocess=spec, limits=limits, input_name=input_name)


def open_eval_dataset(
    evaluation: EvalDataset | None, settings: Settings
) -> CalibrationDataset | None:
    """The build's separate evaluation dataset (None when its request names none)."""
    if evaluation is None:
        return None
    return open_dataset(evaluation.path, evaluation.preprocess, evaluation.input_name, settings)


def request_labels(request: BuildCreate) -> np.ndarray | None:
    """The request's labels as the int64 array the engines take."""
    if request.labels is None:
        return None
    import numpy as np

    return np.asarray(request.labels, dtype=np.int64)


def search_budget(
    flow: Workflow, calibration: Calibration | None, split: Split, request: BuildCreate
) -> MixedPrecisionResult | None:
    """The accuracy budget's search on the held-out samples (None without a budget, or for a
    model that carries its own Q/DQ: nothing to choose)."""
    if request.accuracy_budget is None or calibration is None:
        return None
    result = flow.search_budget(
        calibration.table, split.evaluation, request.accuracy_budget, labels=split.eval_labels
    )
    flow.recorder.log(
        f"Accuracy budget {request.accuracy_budget}: "
        f"{'met' if result.budget_met else 'NOT met'} ({result.value_reached:.6g}), "
        f"{len(result.kept_nodes)} node(s) kept out of INT8, {result.int8_share:.0%} of "
        "quantizable nodes in INT8.",
        level="info" if result.budget_met else "warning",
        stage=Stage.BUILD,
    )
    return result


def rank_nodes(
    flow: Workflow,
    calibration: Calibration | None,
    split: Split,
    request: BuildCreate,
) -> SensitivityReport | None:
    """Per-node INT8 sensitivity on the held-out samples (None unless the request asks)."""
    options = request.sensitivity
    if options is None or calibration is None:
        return None
    from engines.sensitivity import node_sensitivity

    recorder = flow.recorder
    with recorder.stage(Stage.EVALUATE) as progress:
        report = node_sensitivity(
            flow.int8_model_path,
            calibration.table,
            flow.spec,
            split.evaluation,
            metric=options.metric,
            labels=split.eval_labels,
            max_nodes=options.max_nodes,
            all_but_this=not options.only_this,
            samples=options.samples,
            execution=options.execution,
            progress=progress.message,
        )
        worst = ", ".join(report.ranked_nodes[:3])
        recorder.log(
            f"Sensitivity: {report.evaluated_nodes} of {report.quantizable_nodes} nodes evaluated "
            f"({report.evaluations} variants, {report.seconds:.1f} s); most sensitive: {worst}.",
            stage=Stage.EVALUATE,
        )
    return report
