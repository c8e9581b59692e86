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

**Two splits, so the figure is not the search's own.** A search that judges candidates on the
samples it reports on overfits them: it stops at the first keep list that happens to pass there
(one build found cosine 0.998 on its search samples and 0.885 on others, worse than plain INT8).
So the held-out samples are split in two disjoint sets: the *search split* ranks the nodes and
decides every pass/fail of the bisection; the *report split* is used once, at the end, to measure
full INT8 and the chosen mix. ``value_full_int8``, ``value_reached``, ``budget_met`` and
``accuracy`` are report-split figures; ``search_value_full_int8``, ``search_value_reached`` and
``search_accuracy`` are the search split's. The chosen mix always meets the budget on the search
split; on the report split it may not (``budget_met`` says so; nothing is searched again). The
caller gives the two sets as positions in the held-out dataset (:func:`search_split` is the
default: a seeded half/half permutation).

The kept nodes feed ``BuildSpec.keep.int8`` (:meth:`MixedPrecisionResult.apply_to`): the
onnxruntime backend and TensorRT's explicit mode then put no Q/DQ on them, TensorRT's implicit
mode gives them layer precision constraints. The search runs variants in ONNX Runtime on the CPU
(see :class:`engines.variants.QdqExecution` for how Q/DQ is executed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from engines.accuracy_report import AccuracyMetric, AccuracyReport, MetricBudget
from engines.backends.base import ProgressFn, report_progress
from engines.errors import AccuracyBudgetError, SpecError
from engines.mixed_report import MixedPrecisionResult
from engines.sensitivity import rank_sensitivity
from engines.spec import BuildSpec
from engines.variants import QdqExecution, VariantEvaluator

if TYPE_CHECKING:
    from pathlib import Path

    from calibrators.data import CalibrationDataset
    from calibrators.table import CalibrationTable

__all__ = ["MixedPrecisionResult", "ranking_metric", "search_mixed_precision", "search_split"]

_CLASS_COUNT_METRICS = frozenset(
    {
        AccuracyMetric.TOP1_AGREEMENT,
        AccuracyMetric.TOP5_AGREEMENT,
        AccuracyMetric.ACCURACY,
        AccuracyMetric.ACCURACY_DROP,
    }
)


def ranking_metric(metric: AccuracyMetric) -> AccuracyMetric:
    """The metric nodes are ranked by for a budget in ``metric`` (module docstring)."""
    return AccuracyMetric.SQNR_DB if metric in _CLASS_COUNT_METRICS else metric


def search_split(samples: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """The default (search, report) split of ``samples`` held-out samples: a seeded permutation
    cut in two halves (the search split gets the odd one), each sorted."""
    if samples < 2:
        raise SpecError(
            f"An accuracy budget search needs at least 2 held-out samples, got {samples}.",
            hint="Hold out more samples (--eval-fraction) or give more data.",
            field="budget",
        )
    order = np.random.default_rng(seed).permutation(samples)
    cut = (samples + 1) // 2
    return sorted(int(i) for i in order[:cut]), sorted(int(i) for i in order[cut:])


def search_mixed_precision(
    model_path: Path,
    table: CalibrationTable,
    spec: BuildSpec,
    eval_dataset: CalibrationDataset,
    budget: MetricBudget | str,
    *,
    labels: np.ndarray | None = None,
    search_indices: Sequence[int] | None = None,
    report_indices: Sequence[int] | None = None,
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
    model. ``eval_dataset`` holds the held-out samples; ``search_indices`` and
    ``report_indices`` are disjoint positions in it: the nodes are chosen on the first (the
    search split) and the reported figures measured on the second (module docstring). Give
    one and the other is the rest; give neither and :func:`search_split` halves the dataset.
    ``max_samples`` caps each split (its first samples; ``None``: all), held in memory.
    ``labels[i]`` is the class of sample ``i`` (or of its positions), needed for the accuracy
    metrics. Nodes are ranked on the first ``sensitivity_samples`` of the search split,
    evaluating at most ``max_nodes`` nodes (0: rank by the cheap proxy alone), each alone in
    INT8 and, with ``all_but_this``, alone out of it (:func:`engines.sensitivity.node_sensitivity`).
    The second variant only breaks ties of the first, so it is off by default: it doubles the
    ranking cost.

    Raises :class:`AccuracyBudgetError` when even no INT8 at all misses the budget on the
    search split, and :class:`SpecError` for a spec without INT8, a metric the model's outputs
    do not report, or splits that overlap, are empty or fall outside the dataset.
    """
    from engines.graph.inspect import load_model

    start = time.perf_counter()
    budget = MetricBudget.parse(budget) if isinstance(budget, str) else budget
    search_idx, report_idx = _splits(len(eval_dataset), search_indices, report_indices)
    label_array = _labels(labels, len(eval_dataset))
    model = load_model(model_path)

    def evaluator(indices: list[int]) -> VariantEvaluator:
        return VariantEvaluator(
            model,
            spec,
            table,
            eval_dataset.subset(indices),
            labels=None if label_array is None else label_array[indices],
            max_samples=max_samples,
            batch_size=batch_size,
            threads=threads,
            execution=execution,
        )

    with evaluator(search_idx) as ev:
        report_progress(progress, "evaluating full INT8", 0.0)
        search_full = ev.evaluate((), budget=budget)
        sensitivity = None
        kept: list[str] = []
        search_report = search_full
        if not search_full.passed:
            sensitivity = rank_sensitivity(
                ev,
                ranking_metric(budget.metric),
                max_nodes=max_nodes,
                all_but_this=all_but_this,
                samples=sensitivity_samples,
                progress=None if progress is None else _scaled(progress, 0.05, 0.8),
            )
            kept, search_report = _bisect(
                ev, sensitivity.ranked_nodes, budget, _budget_value(search_full), progress
            )
        quantizable = ev.quantizable_count
    report_progress(progress, "measuring on the report split", 0.95)
    with evaluator(report_idx) as holdout:
        report_full = holdout.evaluate((), budget=budget)
        report = holdout.evaluate(kept, budget=budget) if kept else report_full
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
        value_full_int8=_budget_value(report_full),
        value_reached=_budget_value(report),
        budget_met=bool(report.passed),
        search_value_full_int8=_budget_value(search_full),
        search_value_reached=_budget_value(search_report),
        accuracy=report,
        search_accuracy=search_report,
        sensitivity=sensitivity,
        evaluations=ev.evaluations + holdout.evaluations,
        samples=holdout.samples,
        search_samples=ev.samples,
        search_indices=search_idx,
        report_indices=report_idx,
        seconds=time.perf_counter() - start,
    )


def _splits(
    total: int, search: Sequence[int] | None, report: Sequence[int] | None
) -> tuple[list[int], list[int]]:
    """Validated (search, report) positions; a missing one is the complement of the other."""
    if search is None and report is None:
        return search_split(total)
    everything = set(range(total))
    found = [None if s is None else [int(i) for i in s] for s in (search, report)]
    first = found[0] if found[0] is not None else sorted(everything - set(found[1] or ()))
    second = found[1] if found[1] is not None else sorted(everything - set(first))
    for name, split in (("search", first), ("report", second)):
        if not split:
            raise SpecError(
                f"The {name} split of the accuracy budget search is empty.",
                hint="Give both splits at least one held-out sample.",
                field="budget",
            )
        if not set(split) <= everything or len(set(split)) != len(split):
            raise SpecError(
                f"The {name} split must list distinct sample positions in [0, {total}).",
                hint="Give positions in the held-out dataset, each once.",
                field="budget",
            )
    if set(first) & set(second):
        raise SpecError(
            "The search and report splits of the accuracy budget search overlap.",
            hint="Give disjoint sample positions: the figure must come from samples the search "
            "did not choose on.",
            field="budget",
        )
    return first, second


def _labels(labels: np.ndarray | None, total: int) -> np.ndarray | None:
    if labels is None:
        return None
    array = np.asarray(labels)
    if array.ndim < 1 or len(array) < total:
        raise SpecError(
            f"{len(array) if array.ndim else 0} labels for {total} held-out samples.",
            hint="Give one label (or one row of labels) per held-out sample, in order.",
            field="labels",
        )
    return array


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
