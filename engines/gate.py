"""The accuracy gate: what a reduced-precision build must reach against FP32 to count as built.

Every INT8 or FP16 build is compared with the FP32 model on held-out samples
(:func:`engines.accuracy.compare`); :func:`evaluate_gate` checks that report against an
:class:`AccuracyGate`, a tuple of :class:`engines.accuracy.MetricBudget` that must hold on
**every** float output reporting the metric. A build that misses it fails with
:class:`engines.errors.AccuracyGateFailedError` (code ``accuracy_gate_failed``); its artifact is
still there to inspect.

Written ``METRIC:VALUE`` (repeatable) or ``none`` (:meth:`AccuracyGate.parse`); in a spec,
``BuildSpec.gate`` is ``None`` for the precision's default (:func:`default_gate`), a gate, or the
text ``"none"``.

**Default thresholds** (:data:`DEFAULT_THRESHOLDS`, the one place they are written), chosen
from measurements on real models (``bench/int8_quality.py``; the whole table of sound, degraded
and collapsed builds is in bench/README.md, "INT8 on real models"):

=====================================================  =========  ========  ==============
build                                                  SQNR (dB)  cosine    task metric
=====================================================  =========  ========  ==============
collapsed: PP-OCRv4 recognizer, entropy (bench)        2.5        0.720     char acc 0.000
collapsed: issue 9's detector / classifier, entropy    3.5 / 6.8  0.31      top-1 agr. 0.83
degraded: MiniLM, entropy (bench)                      10.9       0.959     cosine 0.959
sound, worst: PP-OCRv4 recognizer, percentile (bench)  12.4       0.971     char acc 0.990
sound, worst FP16: PP-OCRv4 recognizer (bench)         32.9       0.9997
=====================================================  =========  ========  ==============

- INT8 and INT8-FP16: SQNR >= 10 dB, between the best collapsed build (6.8 dB) and the worst
  sound one (12.4 dB), more than 2 dB from each; degraded-but-usable builds (MiniLM entropy,
  10.9 dB) pass, and the default builds (``auto`` with smoothing and bias correction) reach
  16.6-34.2 dB on the same models.
- FP16: SQNR >= 25 dB: the worst sound FP16 build measured 32.9 dB; FP16 overflow gives NaN or
  infinity (which fails any budget) or loses far more.
- FP32: no gate (the build is the reference).

The gate is only as good as the held-out samples: INT8 text detectors measured on photos with no
text (outputs near zero everywhere) sit at 1.4-8.0 dB and fail it; hold out samples that look
like the inputs the engine will serve.

SQNR alone, because it implies the rest: SQNR >= s dB bounds the error to
``||c - r|| <= 10^(-s/20) ||r||``, hence the whole-output cosine to
``>= sqrt(1 - 10^(-s/10))`` (0.949 at 10 dB, 0.9984 at 25 dB). Top-1 agreement is not in the
default: not every output holds class scores, and the agreement of a sound build depends on the
model's margins; give it with ``--gate top1_agreement:0.95`` where it matters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engines.accuracy_report import (
    AccuracyMetric,
    AccuracyReport,
    OutputAccuracy,
    missing_metric_error,
)
from engines.errors import AccuracyGateFailedError
from engines.frozen import FrozenReport
from engines.spec import AccuracyGate

if TYPE_CHECKING:
    from engines.spec import Precision

__all__ = [
    "DEFAULT_THRESHOLDS",
    "GateFailure",
    "GateResult",
    "default_gate",
    "evaluate_gate",
    "gate_error",
    "resolve_gate",
]

DEFAULT_THRESHOLDS: dict[str, tuple[str, ...]] = {
    "int8": ("sqnr_db:10",),
    "fp16": ("sqnr_db:25",),
}
"""Default gate per reduced precision (module docstring): ``int8`` applies to precisions that
use INT8 (int8, int8-fp16), ``fp16`` to fp16 alone. Provisional until ``bench/`` confirms them."""


def default_gate(precision: Precision) -> AccuracyGate:
    """The gate a build of ``precision`` gets when its spec names none (module docstring)."""
    if precision.uses_int8:
        return AccuracyGate.parse(DEFAULT_THRESHOLDS["int8"])
    if precision.uses_fp16:
        return AccuracyGate.parse(DEFAULT_THRESHOLDS["fp16"])
    return AccuracyGate.off()


def resolve_gate(gate: AccuracyGate | None, precision: Precision) -> AccuracyGate:
    """``gate``, or the precision's default when it is None (``BuildSpec.gate``'s meaning)."""
    return default_gate(precision) if gate is None else gate


class GateFailure(FrozenReport):
    """One budget one output misses."""

    output: str
    metric: AccuracyMetric
    value: float
    threshold: float
    higher_is_better: bool

    def __str__(self) -> str:
        want = ">=" if self.higher_is_better else "<="
        return (
            f"{self.output}: {self.metric.value} {self.value:.4g} (needs {want} {self.threshold:g})"
        )


class GateResult(FrozenReport):
    """The gate checked against one accuracy report."""

    gate: AccuracyGate
    gate_text: str
    """The gate as text: ``sqnr_db >= 12, cosine >= 0.9``, or ``none``."""
    passed: bool
    checked_outputs: list[str]
    """Float outputs the budgets were checked on."""
    failures: list[GateFailure]
    samples: int
    """Held-out samples the report was measured on."""

    @property
    def failed_outputs(self) -> list[str]:
        """Outputs with at least one failure, in report order."""
        return list(dict.fromkeys(f.output for f in self.failures))


def evaluate_gate(report: AccuracyReport, gate: AccuracyGate) -> GateResult:
    """Check every budget of ``gate`` on every float output of ``report`` that reports its
    metric (NaN never passes). A gate that is off passes.

    Raises :class:`SpecError` (field ``gate``) for a budget no float output reports (a class
    metric without class-score outputs, an accuracy metric without labels).
    """
    outputs = [o for o in report.outputs if _is_float(o)]
    failures: list[GateFailure] = []
    for budget in gate.budgets:
        measured = [(o.name, getattr(o, budget.metric.field)) for o in outputs]
        present = [(name, float(v)) for name, v in measured if v is not None]
        if not present:
            raise missing_metric_error(budget.metric, "gate")
        failures.extend(
            GateFailure(
                output=name,
                metric=budget.metric,
                value=value,
                threshold=budget.value,
                higher_is_better=budget.metric.higher_is_better,
            )
            for name, value in present
            if not budget.met_by(value)
        )
    return GateResult(
        gate=gate,
        gate_text=str(gate),
        passed=not failures,
        checked_outputs=[o.name for o in outputs] if gate.enabled else [],
        failures=failures,
        samples=report.samples,
    )


def _is_float(output: OutputAccuracy) -> bool:
    # Reports written before the dtype was recorded have "" and were float comparisons.
    return output.dtype == "" or output.dtype.startswith(("float", "bfloat"))


def gate_error(result: GateResult, precision: Precision) -> AccuracyGateFailedError:
    """The error a build that failed ``result`` raises: the failed outputs and values in the
    message, what to try in the hint (tailored to ``precision``)."""
    details = "; ".join(str(f) for f in result.failures)
    outputs = ", ".join(repr(o) for o in result.failed_outputs)
    message = (
        f"The {precision.value} build fails the accuracy gate ({result.gate}) on output(s) "
        f"{outputs} over {result.samples} held-out sample(s): {details}."
    )
    if precision.uses_int8:
        hint = (
            "Try another calibration method (--method minmax, percentile or mse), an accuracy "
            "budget that keeps the most sensitive nodes out of INT8 (--accuracy-budget "
            "sqnr_db:20), or keep rules (--keep NODE); --gate none accepts the build as it is. "
            "The artifact is kept for inspection."
        )
    else:
        hint = (
            "Keep the nodes that overflow or lose precision in FP32 (--keep-fp16 NODE, see the "
            "report's kept nodes), or build fp32; --gate none accepts the build as it is. "
            "The artifact is kept for inspection."
        )
    return AccuracyGateFailedError(
        message,
        hint=hint,
        field="gate",
        failed_outputs=tuple(result.failed_outputs),
    )
