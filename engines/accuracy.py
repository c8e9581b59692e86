"""Compare a candidate (an artifact) with the FP32 reference on held-out samples.

Both runners see the same batches; per output, sufficient statistics are accumulated batch by
batch (sums, maxima, counts; :mod:`engines._accuracy_stats`), so memory does not grow with the
number of samples and no figure depends on the batch size. Definitions, with r the reference and
c the candidate output, and a *sample* the output of one batch row, flattened:

- absolute error ``|c - r|``; relative error ``|c - r| / max(|r|, 1e-12)`` (element-wise; the floor
  keeps exact zeros of the reference finite);
- relative L2 error ``||c - r||_2 / ||r||_2`` over all samples;
- SQNR ``10 log10(sum r^2 / sum (c - r)^2)`` dB over all samples (infinite when c equals r);
- ``cosine`` (field ``cosine_similarity``): the cosine of the whole output,
  ``<r, c> / (||r|| ||c||)`` with every sample's values in one vector (1 when both are all
  zeros, 0 when only one is). It is not a mean of per-sample cosines: a sample whose reference is
  all zeros or nearly (a detector's empty image: sigmoid outputs at 1e-8) has no direction, and
  scores anything from 0 to 1 there however small the candidate's error (an FP16 text detector,
  SQNR 38 dB: whole-output cosine 0.99993, mean of per-sample cosines 0.61);
- ``min_cosine`` (field ``min_cosine_similarity``): the smallest per-sample cosine over the
  samples that are not *negligible*: all zeros, or with an energy ``sum r_i^2`` more than 60 dB
  below the mean sample's (``negligible_reference_samples`` counts them; when every sample is,
  the whole-output cosine). Their error still counts in every other figure;
- class scores (agreement): float outputs whose *class axis* holds at least two scores. The axis
  is the last one for ``[N, C]``, ``[N, T, C]`` (sequences: CTC, token classification) and
  channels-last maps ``[N, H, W, C]`` (rank >= 4 when the last axis is the smallest);
  ``class_axis`` names it otherwise (``1`` for ``[N, C, H, W]``). Every position (each sample,
  time step or pixel) is one prediction: top-1 agreement is the fraction of positions where
  both argmax agree, top-5 agreement (more than 5 classes) the fraction where the reference's
  top class is among the candidate's top 5;
- labels: one class per position, shaped like the output without its class axis (``[N]`` for
  ``[N, C]``, ``[N, T]`` for ``[N, T, C]``, ``[N, H, W]`` for a segmentation map); negative labels
  (padding such as -100) are not scored. Then the true top-1 accuracy of both and
  ``accuracy_drop`` = reference - candidate. A CTC model's character accuracy needs decoding and
  is not measured here: its agreement is per time step;
- tolerances like Polygraphy's: an output fails when any element has ``|c - r| > atol + rtol|r|``
  (a non-finite candidate value always fails).

Infinite and NaN values serialize to JSON as the strings ``"Infinity"`` and ``"NaN"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from engines._accuracy_stats import OutputStats
from engines.accuracy_report import (
    AccuracyReport,
    MetricBudget,
    OutputAccuracy,
    Tolerance,
    missing_metric_error,
)
from engines.errors import RunError, SpecError

if TYPE_CHECKING:
    from calibrators.data import CalibrationDataset
    from engines.backends.base import ProgressFn, Runner

__all__ = [
    "compare",
]


def compare(
    reference: Runner,
    candidate: Runner,
    dataset: CalibrationDataset,
    *,
    batch_size: int = 16,
    max_samples: int | None = None,
    labels: np.ndarray | None = None,
    tolerances: Tolerance | Mapping[str, Tolerance] | None = None,
    budget: MetricBudget | None = None,
    class_axis: int | Mapping[str, int] | None = None,
    progress: ProgressFn | None = None,
) -> AccuracyReport:
    """Run both runners over ``dataset`` (first ``max_samples`` samples) and compare outputs.

    ``labels[i]`` is the class of sample ``i``, or of each of its positions (``[N, T]`` for a
    ``[N, T, C]`` output; module docstring). ``tolerances`` is one :class:`Tolerance` for every
    output, or one per output name (key ``"*"``: the rest). ``budget`` is checked against the
    worst output that reports its metric; :class:`SpecError` if none does. ``class_axis``: the
    axis of the class scores, for every output (an int) or per output name (``"*"``: the rest);
    outputs not given one are detected (module docstring). :class:`SpecError` for an output
    without that axis.
    """
    if batch_size < 1:
        raise SpecError(f"batch_size must be >= 1, got {batch_size}.", field="batch_size")
    data = dataset.validate(list(reference.inputs))
    total = len(data) if max_samples is None else min(len(data), max_samples)
    label_array = _check_labels(labels, total)
    names = list(reference.output_names)
    missing = [n for n in names if n not in candidate.output_names]
    if missing:
        raise RunError(
            f"The candidate has no output(s) {', '.join(missing)} (it has "
            f"{', '.join(candidate.output_names)}).",
            hint="Compare an artifact built from the reference model.",
            field="outputs",
        )
    axes = _class_axes(class_axis, names)
    stats = {
        n: OutputStats(n, _tolerance_pair(_tolerance_for(tolerances, n)), axes.get(n))
        for n in names
    }
    done = 0
    for feeds in data.batches(batch_size, max_samples=total):
        ref_out = reference.run(feeds)
        cand_out = candidate.run(feeds)
        count = int(next(iter(feeds.values())).shape[0])
        batch_labels = None if label_array is None else label_array[done : done + count]
        for name in names:
            stats[name].update(ref_out[name], cand_out[name], batch_labels)
        done += count
        if progress is not None:
            progress("comparing outputs", done / max(total, 1))
    if label_array is not None:
        _check_label_shape(label_array, list(stats.values()))
    outputs = [
        OutputAccuracy(
            **s.fields(label_array is not None),
            tolerance=_tolerance_for(tolerances, s.name),
            passed=None if s.tolerance is None else s.violations == 0,
        )
        for s in stats.values()
    ]
    return _judge(outputs, done, batch_size, budget, reference, candidate)


def _tolerance_for(
    tolerances: Tolerance | Mapping[str, Tolerance] | None, name: str
) -> Tolerance | None:
    if tolerances is None or isinstance(tolerances, Tolerance):
        return tolerances
    return tolerances.get(name, tolerances.get("*"))


def _tolerance_pair(tolerance: Tolerance | None) -> tuple[float, float] | None:
    return None if tolerance is None else (tolerance.atol, tolerance.rtol)


def _class_axes(class_axis: int | Mapping[str, int] | None, names: list[str]) -> dict[str, int]:
    if class_axis is None:
        return {}
    if isinstance(class_axis, int):
        return dict.fromkeys(names, class_axis)
    unknown = sorted(set(class_axis) - {*names, "*"})
    if unknown:
        raise SpecError(
            f"class_axis names output(s) {', '.join(unknown)} the model does not have.",
            hint=f"The outputs are {', '.join(names)}.",
            field="class_axis",
        )
    rest = class_axis.get("*")
    found = {n: class_axis.get(n, rest) for n in names}
    return {n: axis for n, axis in found.items() if axis is not None}


def _check_labels(labels: np.ndarray | None, total: int) -> np.ndarray | None:
    if labels is None:
        return None
    array = np.asarray(labels)
    if array.ndim < 1 or array.dtype.kind not in "iu":
        raise SpecError(
            f"Labels must be an integer array with one row per sample, got {array.dtype} with "
            f"shape {list(array.shape)}.",
            hint="Give one class index per sample ([N]), or per position ([N, T] for a "
            "[N, T, C] output).",
            field="labels",
        )
    if len(array) < total:
        raise SpecError(
            f"{len(array)} labels for {total} samples.",
            hint="Give one label per dataset sample, in the dataset's order.",
            field="labels",
        )
    return array[:total]


def _check_label_shape(labels: np.ndarray, stats: list[OutputStats]) -> None:
    """Labels must fit at least one class-score output: shaped like it without its class axis."""
    wanted = tuple(labels.shape[1:])
    shapes = {s.name: s.label_shape() for s in stats if s.classifier}
    if any(shape == wanted for shape in shapes.values()):
        return
    if not shapes:
        raise SpecError(
            "Labels were given but no output holds class scores (a float output whose last "
            "axis holds them: [N, C], [N, T, C], [N, H, W, C]).",
            hint="Drop the labels, or name the class axis (class_axis, e.g. 1 for [N, C, H, W]).",
            field="labels",
        )
    expected = "; ".join(f"{n}: [N{''.join(f', {d}' for d in v or ())}]" for n, v in shapes.items())
    raise SpecError(
        f"Labels of shape [N{''.join(f', {d}' for d in wanted)}] fit no class-score output "
        f"(expected {expected}).",
        hint="Give one class index per sample or per position of a class-score output.",
        field="labels",
    )


def _judge(
    outputs: list[OutputAccuracy],
    samples: int,
    batch_size: int,
    budget: MetricBudget | None,
    reference: Runner,
    candidate: Runner,
) -> AccuracyReport:
    failures = [
        f"output {o.name!r}: {o.tolerance_violations} of {o.elements} values outside "
        f"atol {o.tolerance.atol:g} + rtol {o.tolerance.rtol:g} (max abs error {o.max_abs_error:.3g})"
        for o in outputs
        if o.passed is False and o.tolerance is not None
    ]
    judged = any(o.passed is not None for o in outputs)
    budget_value = None
    if budget is not None:
        report = AccuracyReport(samples=samples, batch_size=batch_size, outputs=outputs)
        budget_value = report.metric(budget.metric)
        if budget_value is None:
            raise missing_metric_error(budget.metric, "budget")
        judged = True
        if not budget.met_by(budget_value):
            failures.append(f"budget {budget} not met: {budget_value:.6g}")
    return AccuracyReport(
        samples=samples,
        batch_size=batch_size,
        outputs=outputs,
        budget=budget,
        budget_value=budget_value,
        passed=(not failures) if judged else None,
        failures=failures,
        reference=dict(reference.describe()),
        candidate=dict(candidate.describe()),
    )
