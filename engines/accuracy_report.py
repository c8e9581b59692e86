"""The accuracy report and its vocabulary (metrics, budgets, tolerances): light types that the
wire schemas and the HTTP client take. The comparison itself is :func:`engines.accuracy.compare`."""

from __future__ import annotations

import math
from enum import StrEnum

from pydantic import Field

from engines.errors import SpecError
from engines.frozen import FrozenReport

__all__ = ["AccuracyMetric", "AccuracyReport", "MetricBudget", "OutputAccuracy", "Tolerance"]


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
    dtype: str = ""
    """The reference output's element type (``float32``...)."""
    sample_shape: list[int]
    samples: int
    elements: int
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    mean_rel_error: float
    rel_l2_error: float
    cosine_similarity: float
    """Cosine of the whole output (metric ``cosine``)."""
    min_cosine_similarity: float
    """Smallest per-sample cosine over the samples whose reference is not negligible
    (``min_cosine``; module docstring)."""
    negligible_reference_samples: int = 0
    """Samples whose reference is all zeros or 60 dB below the mean sample's energy, left out
    of ``min_cosine_similarity``."""
    sqnr_db: float
    nonfinite_values: int
    """Candidate values that are NaN or infinite."""
    classifier: bool
    """Whether the output holds class scores (``class_axis`` is set)."""
    class_axis: int | None = None
    """The axis of the class scores, counted with the batch axis as 0."""
    class_positions: int | None = None
    """Predictions compared: samples times positions per sample (time steps, pixels)."""
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    labelled_positions: int | None = None
    """Positions with a label (>= 0) the accuracies are measured on."""
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


_CLASS_METRICS = {AccuracyMetric.TOP1_AGREEMENT, AccuracyMetric.TOP5_AGREEMENT}


_LABEL_METRICS = {AccuracyMetric.ACCURACY, AccuracyMetric.ACCURACY_DROP}


def missing_metric_error(metric: AccuracyMetric, field: str) -> SpecError:
    """The error for a budget or gate in ``metric`` that no output of the model reports."""
    if metric in _LABEL_METRICS:
        hint = "Give labels (one class per sample or per position), or choose cosine or sqnr_db."
    elif metric in _CLASS_METRICS:
        hint = (
            "No output holds class scores on its last axis; name the axis with class_axis "
            "(e.g. 1 for [N, C, H, W]), or choose cosine or sqnr_db."
        )
    else:
        hint = "Choose a metric the outputs have, e.g. cosine or sqnr_db."
    needs = " (labels are needed)" if metric in _LABEL_METRICS else ""
    return SpecError(f"No output reports {metric.value}{needs}.", hint=hint, field=field)
