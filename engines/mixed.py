"""Automatic mixed precision: the fewest nodes to keep out of INT8 so that an accuracy budget holds.

A budget is a :class:`engines.accuracy.MetricBudget`, written ``METRIC:VALUE``:
``top1_agreement:0.99``, ``cosine:0.999``, ``sqnr_db:30`` (at least), ``accuracy_drop:0.005``
(at most, with labels); the direction comes from the metric.

:func:`search_mixed_precision` starts from full INT8. If it meets the budget, done. Otherwise the
quantizable nodes are ranked most sensitive first (:mod:`engines.sensitivity`) into a list ``R``;
with ``keep(k)`` the top ``k`` of ``R`` kept out of INT8, a bisection finds the smallest ``k``
whose model meets the budget, assuming that keeping more nodes never hurts. ``keep(0)`` is known
to fail; ``keep(len(R))``, no INT8 at all, is evaluated only when no smaller ``k`` passes, and if
it fails too the budget is out of reach (:class:`AccuracyBudgetError`). The returned choice is
always one that was evaluated and met the budget, monotonic or not.

The ranking metric is the budget's own when it is continuous; class-count metrics (top-1/top-5
agreement, accuracy, accuracy drop) tie on most single-node changes, so nodes are then ranked by
output SQNR while the budget is still judged in its own metric (:func:`ranking_metric`).

The kept nodes feed ``BuildSpec.keep.int8`` (:meth:`MixedPrecisionResult.apply_to`): the
onnxruntime backend and TensorRT's explicit mode then put no Q/DQ on them, TensorRT's implicit
mode gives them layer precision constraints. The search runs variants in ONNX Runtime on the CPU
(see :class:`engines.variants.QdqExecution` for how Q/DQ is executed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from engines.accuracy import AccuracyMetric, AccuracyReport, MetricBudget
from engines.backends.base import ProgressFn, report_progress
from engines.errors import AccuracyBudgetError
from engines.frozen import FrozenReport
from engines.sensitivity import SensitivityReport, rank_sensitivity
from engines.spec import BuildSpec, KeepRules
from engines.variants import QdqExecution, VariantEvaluator

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from calibrators.data import CalibrationDataset
    from calibrators.table import CalibrationTable

__all__ = ["MixedPrecisionResult", "ranking_metric", "search_mixed_precision"]

_CLASS_COUNT_METRICS = frozenset(
    {
        AccuracyMetric.TOP1_AGREEMENT,
        AccuracyMetric.TOP5_AGREEMENT,
        AccuracyMetric.ACCURACY,
        AccuracyMetric.ACCURACY_DROP,
    }
)


class MixedPrecisionResult(FrozenReport):
    """The nodes to keep out of INT8 so that the budget is met, and what that reaches."""

    budget: MetricBudget
    execution: QdqExecution
    weight_levels: int
    """INT8 weight levels the search built variants with (:mod:`engines.variants`)."""
    kept_nodes: list[str]
    """Kept out of INT8, most sensitive first (beyond the spec's own ``keep.int8`` patterns)."""
    keep_patterns: list[str]
    """``kept_nodes`` as ``BuildSpec.keep`` patterns matching exactly those nodes
    (:func:`engines.variants.keep_patterns`)."""
    quantizable_nodes: int
    int8_nodes: int
    int8_share: float
    """``int8_nodes / quantizable_nodes`` (1.0 when nothing is quantizable)."""
    value_full_int8: float
    """The budget's metric with every quantizable node in INT8."""
    value_reached: float
    """The budget's metric of the chosen mix (it meets the budget)."""
    accuracy: AccuracyReport
    """The chosen mix against the FP32 reference."""
    sensitivity: SensitivityReport | None
    """``None`` when full INT8 already met the budget."""
    evaluations: int
    """Model variants built and compared, sensitivity included."""
    samples: int
    seconds: float

    def apply_to(self, spec: BuildSpec) -> BuildSpec:
        """``spec`` with the kept nodes added to ``keep.int8``."""
        extra = tuple(p for p in self.keep_patterns if p not in spec.keep.int8)
        keep = KeepRules(int8=(*spec.keep.int8, *extra), fp16=spec.keep.fp16)
        return spec.model_copy(update={"keep": keep})


def ranking_metric(metric: AccuracyMetric) -> AccuracyMetric:
    """The metric nodes are ranked by for a budget in ``metric`` (module docstring)."""
    return AccuracyMetric.SQNR_DB if metric in _CLASS_COUNT_METRICS else metric


def search_mixed_precision(
    model_path: Path,
    table: CalibrationTable,
    spec: BuildSpec,
    eval_dataset: CalibrationDataset,
    budget: MetricBudget | str,
    *,
    labels: np.ndarray | None = None,
    max_nodes: int | None = None,
    all_but_this: bool = False,
    max_samples: int | None = 256,
    sensitivity_samples: int = 32,
    batch_size: int = 16,
    threads: int | None = None,
    execution: QdqExecution | None = None,
    progress: ProgressFn | None = None,
) -> MixedPrecisionResult:
    """The fewest most sensitive nodes to keep out of INT8 so that ``budget`` is met.

    ``budget`` is a :class:`MetricBudget` or its text (``cosine:0.999``), judged against the FP32
    model on the first ``max_samples`` samples of ``eval_dataset`` (held in memory; ``None``:
    all). ``labels[i]`` is the class of sample ``i``, needed for the accuracy metrics. Nodes are
    ranked on the first ``sensitivity_samples`` of those samples, evaluating at most
    ``max_nodes`` nodes (0: rank by the cheap proxy alone), each alone in INT8 and, with
    ``all_but_this``, alone out of it (:func:`engines.sensitivity.node_sensitivity`). The second
    variant only breaks ties of the first, so it is off by default: it doubles the ranking cost.

    Raises :class:`AccuracyBudgetError` when even no INT8 at all misses the budget, and
    :class:`SpecError` for a spec without INT8 or a metric the model's outputs do not report.
    """
    from engines.graph.inspect import load_model

    start = time.perf_counter()
    budget = MetricBudget.parse(budget) if isinstance(budget, str) else budget
    with VariantEvaluator(
        load_model(model_path),
        spec,
        table,
        eval_dataset,
        labels=labels,
        max_samples=max_samples,
        batch_size=batch_size,
        threads=threads,
        execution=execution,
    ) as ev:
        report_progress(progress, "evaluating full INT8", 0.0)
        report = ev.evaluate((), budget=budget)
        full_value = _budget_value(report)
        sensitivity = None
        kept: list[str] = []
        if not report.passed:
            sensitivity = rank_sensitivity(
                ev,
                ranking_metric(budget.metric),
                max_nodes=max_nodes,
                all_but_this=all_but_this,
                samples=sensitivity_samples,
                progress=None if progress is None else _scaled(progress, 0.05, 0.8),
            )
            kept, report = _bisect(ev, sensitivity.ranked_nodes, budget, full_value, progress)
        quantizable = ev.quantizable_count
    report_progress(progress, "done", 1.0)
    return MixedPrecisionResult(
        budget=budget,
        execution=ev.execution,
        weight_levels=ev.weight_levels,
        kept_nodes=kept,
        keep_patterns=list(ev.keep_patterns(kept)),
        quantizable_nodes=quantizable,
        int8_nodes=quantizable - len(kept),
        int8_share=(quantizable - len(kept)) / quantizable if quantizable else 1.0,
        value_full_int8=full_value,
        value_reached=_budget_value(report),
        accuracy=report,
        sensitivity=sensitivity,
        evaluations=ev.evaluations,
        samples=ev.samples,
        seconds=time.perf_counter() - start,
    )


def _scaled(progress: ProgressFn, low: float, high: float) -> ProgressFn:
    def step(stage: str, fraction: float) -> None:
        progress(stage, low + (high - low) * fraction)

    return step


def _budget_value(report: AccuracyReport) -> float:
    if report.budget_value is None:  # compare() raises first; kept for the type checker
        raise AccuracyBudgetError("The comparison did not evaluate the budget.")
    return report.budget_value


def _bisect(
    ev: VariantEvaluator,
    ranked: list[str],
    budget: MetricBudget,
    full_value: float,
    progress: ProgressFn | None,
) -> tuple[list[str], AccuracyReport]:
    """The smallest ``k`` whose top-``k`` keep list meets the budget; ``keep(0)`` failed."""
    passing: dict[int, AccuracyReport] = {}
    lo, hi = 0, len(ranked)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        report_progress(progress, f"trying {mid} of {len(ranked)} nodes out of INT8", 0.85)
        report = ev.evaluate(ranked[:mid], budget=budget)
        if report.passed:
            hi, passing[mid] = mid, report
        else:
            lo = mid
    if hi not in passing:
        report = ev.evaluate(ranked[:hi], budget=budget)
        if not report.passed:
            raise _unreachable(ev, len(ranked), budget, _budget_value(report), full_value)
        passing[hi] = report
    return ranked[:hi], passing[hi]


def _unreachable(
    ev: VariantEvaluator, nodes: int, budget: MetricBudget, value: float, full_value: float
) -> AccuracyBudgetError:
    fp16 = ev.spec.precision.uses_fp16
    return AccuracyBudgetError(
        f"Even with all {nodes} quantizable nodes out of INT8, {budget.metric.value} is "
        f"{value:.6g} (full INT8: {full_value:.6g}); the budget {budget} cannot be met"
        + (" with FP16 in the rest of the model." if fp16 else "."),
        hint=(
            "Use precision int8 (FP32 fallback) instead of int8-fp16, keep nodes out of FP16, "
            "or loosen the budget."
            if fp16
            else "Loosen the budget: the FP32 model itself does not reach it on these samples "
            "(for accuracy budgets, check that the labels match the samples)."
        ),
        field="budget",
    )
