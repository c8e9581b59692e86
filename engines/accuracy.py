"""Compare a candidate (an artifact) with the FP32 reference on held-out samples.

Both runners see the same batches; per output, sufficient statistics are accumulated batch by
batch (sums, maxima, per-sample cosines, argmax agreement counts), so memory does not grow with
the number of samples. Definitions, with r the reference and c the candidate output:

- absolute error ``|c - r|``; relative error ``|c - r| / max(|r|, 1e-12)`` (element-wise; the floor
  keeps exact zeros of the reference finite);
- relative L2 error ``||c - r||_2 / ||r||_2`` over all samples;
- cosine similarity ``<r, c> / (||r|| ||c||)`` per sample (the output row of one sample, flattened),
  reported as the mean over samples and the minimum; two all-zero rows count as 1;
- SQNR ``10 log10(sum r^2 / sum (c - r)^2)`` dB (infinite when c equals r);
- for class-score outputs (2-D ``[N, C]`` float with C >= 2): top-1 agreement (same argmax) and,
  when C > 5, top-5 agreement (the reference's top class is among the candidate's top 5); with
  labels, the true top-1 accuracy of both and ``accuracy_drop`` = reference - candidate;
- tolerances like Polygraphy's: an output fails when any element has ``|c - r| > atol + rtol|r|``
  (a non-finite candidate value always fails).

Infinite and NaN values serialize to JSON as the strings ``"Infinity"`` and ``"NaN"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from engines.backends.base import ProgressFn, Runner
from engines.errors import RunError, SpecError
from engines.frozen import FrozenReport

if TYPE_CHECKING:
    from calibrators.data import CalibrationDataset

__all__ = [
    "AccuracyMetric",
    "AccuracyReport",
    "MetricBudget",
    "OutputAccuracy",
    "Tolerance",
    "compare",
]

_REL_FLOOR = 1e-12


class AccuracyMetric(StrEnum):
    """A metric an accuracy budget can be stated in."""

    TOP1_AGREEMENT = "top1_agreement"
    TOP5_AGREEMENT = "top5_agreement"
    COSINE = "cosine"
    MIN_COSINE = "min_cosine"
    SQNR_DB = "sqnr_db"
    ACCURACY = "accuracy"
    ACCURACY_DROP = "accuracy_drop"
    MAX_ABS_ERROR = "max_abs_error"
    MEAN_ABS_ERROR = "mean_abs_error"
    MAX_REL_ERROR = "max_rel_error"
    MEAN_REL_ERROR = "mean_rel_error"
    REL_L2_ERROR = "rel_l2_error"

    @property
    def higher_is_better(self) -> bool:
        return self in _HIGHER_IS_BETTER

    @property
    def field(self) -> str:
        """The :class:`OutputAccuracy` field holding this metric."""
        return _FIELDS.get(self, self.value)


_HIGHER_IS_BETTER = {
    AccuracyMetric.TOP1_AGREEMENT,
    AccuracyMetric.TOP5_AGREEMENT,
    AccuracyMetric.COSINE,
    AccuracyMetric.MIN_COSINE,
    AccuracyMetric.SQNR_DB,
    AccuracyMetric.ACCURACY,
}
_FIELDS = {
    AccuracyMetric.COSINE: "cosine_similarity",
    AccuracyMetric.MIN_COSINE: "min_cosine_similarity",
    AccuracyMetric.ACCURACY: "candidate_accuracy",
}


class MetricBudget(FrozenReport):
    """An accuracy requirement such as ``cosine:0.999`` (at least) or ``accuracy_drop:0.005``
    (at most); the direction comes from the metric."""

    metric: AccuracyMetric
    value: float

    @classmethod
    def parse(cls, text: str) -> MetricBudget:
        """Parse ``METRIC:VALUE``, e.g. ``top1_agreement:0.99``, ``sqnr_db:30``."""
        name, sep, raw = text.strip().partition(":")
        choices = ", ".join(m.value for m in AccuracyMetric)
        try:
            metric = AccuracyMetric(name.strip().lower())
            value = float(raw)
        except ValueError as exc:
            raise SpecError(
                f"Cannot read the accuracy budget {text!r}.",
                hint=f"Write METRIC:VALUE, e.g. cosine:0.999; metrics: {choices}.",
                field="budget",
            ) from exc
        if not sep or not math.isfinite(value):
            raise SpecError(
                f"The accuracy budget {text!r} needs a finite value.",
                hint="Write METRIC:VALUE, e.g. cosine:0.999.",
                field="budget",
            )
        return cls(metric=metric, value=value)

    def met_by(self, value: float) -> bool:
        """Whether a measured ``value`` satisfies the budget (NaN never does)."""
        return value >= self.value if self.metric.higher_is_better else value <= self.value

    def __str__(self) -> str:
        return (
            f"{self.metric.value} {'>=' if self.metric.higher_is_better else '<='} {self.value:g}"
        )


class Tolerance(FrozenReport):
    """Element-wise tolerance: fail where ``|c - r| > atol + rtol * |r|`` (Polygraphy's defaults)."""

    atol: float = Field(default=1e-5, ge=0)
    rtol: float = Field(default=1e-5, ge=0)


class OutputAccuracy(FrozenReport):
    """How one output of the candidate differs from the reference (module docstring)."""

    name: str
    sample_shape: list[int]
    samples: int
    elements: int
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    mean_rel_error: float
    rel_l2_error: float
    cosine_similarity: float
    min_cosine_similarity: float
    sqnr_db: float
    nonfinite_values: int
    """Candidate values that are NaN or infinite."""
    classifier: bool
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    accuracy_drop: float | None = None
    tolerance: Tolerance | None = None
    tolerance_violations: int = 0
    passed: bool | None = None
    """Against ``tolerance``; ``None`` when none was given."""


class AccuracyReport(FrozenReport):
    """The candidate against the reference over ``samples`` held-out samples."""

    samples: int
    batch_size: int
    outputs: list[OutputAccuracy]
    budget: MetricBudget | None = None
    budget_value: float | None = None
    """The budget's metric, worst over the outputs that have it."""
    passed: bool | None = None
    """All tolerance and budget checks; ``None`` when neither was asked for."""
    failures: list[str] = Field(default_factory=list)
    reference: dict[str, str] = Field(default_factory=dict)
    candidate: dict[str, str] = Field(default_factory=dict)

    def output(self, name: str) -> OutputAccuracy:
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(name)

    def metric(self, metric: AccuracyMetric) -> float | None:
        """``metric``'s worst value over the outputs that report it, or None if none does."""
        values = [getattr(o, metric.field) for o in self.outputs]
        present = [float(v) for v in values if v is not None]
        if not present:
            return None
        if any(math.isnan(v) for v in present):
            return math.nan
        return min(present) if metric.higher_is_better else max(present)


class _OutputStats:
    """Sufficient statistics of one output, updated batch by batch."""

    def __init__(self, name: str, tolerance: Tolerance | None) -> None:
        self.name = name
        self.tolerance = tolerance
        self.sample_shape: tuple[int, ...] | None = None
        self.samples = self.elements = self.nonfinite = self.violations = 0
        self.max_abs = self.sum_abs = self.max_rel = self.sum_rel = 0.0
        self.sum_sq_err = self.sum_sq_ref = self.sum_cos = 0.0
        self.min_cos = math.inf
        self.classifier = True
        self.top1 = self.top5 = self.ref_correct = self.cand_correct = 0
        self.top5_possible = True

    def update(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        if ref.shape != cand.shape:
            raise RunError(
                f"Output {self.name!r} has shape {list(cand.shape)} from the candidate but "
                f"{list(ref.shape)} from the reference.",
                hint="Compare artifacts built from the same model.",
                field="outputs",
            )
        r = ref.astype(np.float64, copy=False)
        c = cand.astype(np.float64, copy=False)
        rows = r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1)
        crow = c.reshape(rows.shape)
        self.sample_shape = tuple(r.shape[1:])
        self._errors(r, c)
        self._cosines(rows, crow)
        self.classifier = self.classifier and ref.ndim == 2 and ref.shape[1] >= 2
        self.classifier = self.classifier and ref.dtype.kind == "f"
        if self.classifier:
            self._classes(r, c, labels)
        self.samples += rows.shape[0]

    def _errors(self, r: np.ndarray, c: np.ndarray) -> None:
        err = np.abs(c - r)
        rel = err / np.maximum(np.abs(r), _REL_FLOOR)
        self.elements += err.size
        self.nonfinite += int(np.count_nonzero(~np.isfinite(c)))
        if err.size:
            self.max_abs = _nanmax(self.max_abs, float(err.max()))
            self.max_rel = _nanmax(self.max_rel, float(rel.max()))
        self.sum_abs += float(err.sum())
        self.sum_rel += float(rel.sum())
        self.sum_sq_err += float(np.square(err).sum())
        self.sum_sq_ref += float(np.square(r).sum())
        if self.tolerance is not None:
            bound = self.tolerance.atol + self.tolerance.rtol * np.abs(r)
            self.violations += int(np.count_nonzero(~(err <= bound)))  # NaN counts as a violation

    def _cosines(self, r: np.ndarray, c: np.ndarray) -> None:
        dot = np.einsum("ij,ij->i", r, c)
        norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
        both_zero = (np.linalg.norm(r, axis=1) == 0) & (np.linalg.norm(c, axis=1) == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
        cos = np.where(both_zero, 1.0, cos)
        self.sum_cos += float(cos.sum())
        if cos.size:
            self.min_cos = _nanmin(self.min_cos, float(cos.min()))

    def _classes(self, r: np.ndarray, c: np.ndarray, labels: np.ndarray | None) -> None:
        ref_top = r.argmax(axis=1)
        self.top1 += int(np.count_nonzero(ref_top == c.argmax(axis=1)))
        if c.shape[1] > 5:
            top5 = np.argpartition(-c, 5, axis=1)[:, :5]
            self.top5 += int(np.count_nonzero((top5 == ref_top[:, None]).any(axis=1)))
        else:
            self.top5_possible = False
        if labels is not None:
            self.ref_correct += int(np.count_nonzero(ref_top == labels))
            self.cand_correct += int(np.count_nonzero(c.argmax(axis=1) == labels))

    def result(self, with_labels: bool) -> OutputAccuracy:
        n = max(self.samples, 1)
        sqnr = (
            10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)
            if self.sum_sq_err > 0 and self.sum_sq_ref > 0
            else (math.inf if self.sum_sq_err == 0 else -math.inf)
        )
        if math.isnan(self.sum_sq_err):
            sqnr = math.nan
        rel_l2 = (
            math.sqrt(self.sum_sq_err / self.sum_sq_ref)
            if self.sum_sq_ref > 0
            else (0.0 if self.sum_sq_err == 0 else math.inf)
        )
        classes: dict[str, float | None] = {}
        if self.classifier:
            classes["top1_agreement"] = self.top1 / n
            classes["top5_agreement"] = self.top5 / n if self.top5_possible else None
            if with_labels:
                ref_acc, cand_acc = self.ref_correct / n, self.cand_correct / n
                classes |= {
                    "reference_accuracy": ref_acc,
                    "candidate_accuracy": cand_acc,
                    "accuracy_drop": ref_acc - cand_acc,
                }
        return OutputAccuracy(
            name=self.name,
            sample_shape=list(self.sample_shape or ()),
            samples=self.samples,
            elements=self.elements,
            max_abs_error=self.max_abs,
            mean_abs_error=self.sum_abs / max(self.elements, 1),
            max_rel_error=self.max_rel,
            mean_rel_error=self.sum_rel / max(self.elements, 1),
            rel_l2_error=rel_l2,
            cosine_similarity=self.sum_cos / n,
            min_cosine_similarity=self.min_cos if self.samples else 1.0,
            sqnr_db=sqnr,
            nonfinite_values=self.nonfinite,
            classifier=self.classifier,
            tolerance=self.tolerance,
            tolerance_violations=self.violations,
            passed=None if self.tolerance is None else self.violations == 0,
            **classes,
        )


def _nanmax(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _nanmin(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


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
    progress: ProgressFn | None = None,
) -> AccuracyReport:
    """Run both runners over ``dataset`` (first ``max_samples`` samples) and compare outputs.

    ``labels[i]`` is the class of sample ``i``. ``tolerances`` is one :class:`Tolerance` for
    every output, or one per output name (key ``"*"``: the rest). ``budget`` is checked against
    the worst output that reports its metric; :class:`SpecError` if none does.
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
    stats = {n: _OutputStats(n, _tolerance_for(tolerances, n)) for n in names}
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
    outputs = [s.result(label_array is not None) for s in stats.values()]
    if label_array is not None and not any(o.classifier for o in outputs):
        raise SpecError(
            "Labels were given but no output looks like class scores (a 2-D [N, C] float output).",
            hint="Drop --labels, or compare a classifier.",
            field="labels",
        )
    return _judge(outputs, done, batch_size, budget, reference, candidate)


def _tolerance_for(
    tolerances: Tolerance | Mapping[str, Tolerance] | None, name: str
) -> Tolerance | None:
    if tolerances is None or isinstance(tolerances, Tolerance):
        return tolerances
    return tolerances.get(name, tolerances.get("*"))


def _check_labels(labels: np.ndarray | None, total: int) -> np.ndarray | None:
    if labels is None:
        return None
    array = np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise SpecError(
            f"Labels must be a 1-D integer array, got {array.dtype} with shape {list(array.shape)}.",
            hint="Give one class index per sample.",
            field="labels",
        )
    if len(array) < total:
        raise SpecError(
            f"{len(array)} labels for {total} samples.",
            hint="Give one label per dataset sample, in the dataset's order.",
            field="labels",
        )
    return array[:total]


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
            raise SpecError(
                f"No output reports {budget.metric.value}"
                + (" (labels are needed)" if "accuracy" in budget.metric.value else "")
                + ".",
                hint="Choose a metric the outputs have, e.g. cosine or sqnr_db.",
                field="budget",
            )
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
