"""The report of a variant sweep (:func:`engines.sweep.sweep`): its values, the Pareto front, and
its Markdown and SVG renderings.

The report compares variants on one latency statistic (the median, p50) and one accuracy metric
(the sweep chooses it). ``speedup_vs_fp32`` is the FP32 variant's median latency over the
variant's, ``size_vs_fp32`` its artifact's size over the FP32 artifact's; where either would
surprise (slower than FP32, an INT8 ONNX artifact as large as FP32), the Markdown says why in
words next to the table (:mod:`engines.fp32_notes`). A variant is on the *Pareto front* when no other variant is at least as fast and at
least as accurate, and strictly better in one of the two (:func:`pareto_front`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from pydantic import Field

from calibrators.spec import MethodSpec
from engines.accuracy_report import AccuracyMetric, AccuracyReport, MetricBudget
from engines.charts import BarGroup, Box, ScatterPoint, bars_panel, scatter_panel, svg_document
from engines.fp32_notes import Fp32Facts, size_note, size_reason, speed_note, speed_reason
from engines.frozen import FrozenReport
from engines.gate import GateResult
from engines.mixed import MixedPrecisionResult
from engines.perf_report import BenchmarkOptions, PerfReport
from engines.spec import Precision

__all__ = [
    "ChartRow",
    "SweepReport",
    "VariantFailure",
    "VariantResult",
    "default_metric",
    "pareto_front",
    "ratios_vs_fp32",
    "render_chart_svg",
    "render_markdown",
    "render_svg",
]


class VariantResult(FrozenReport):
    """One variant's artifact, speed and accuracy."""

    name: str
    precision: Precision
    budget: MetricBudget | None = None
    artifact: str
    """The artifact's file name in the sweep's folder."""
    artifact_sha256: str
    size_bytes: int
    build_seconds: float
    search_seconds: float = 0.0
    """Automatic mixed precision search (``auto`` variants), not included in ``build_seconds``."""
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    throughput_qps: float
    accuracy_value: float
    """The sweep's :attr:`SweepReport.accuracy_metric` for this variant."""
    speedup_vs_fp32: float | None
    """FP32 median latency / this median latency; ``None`` without an fp32 variant."""
    size_vs_fp32: float | None = None
    """This artifact's size / the FP32 artifact's; ``None`` without an fp32 variant."""
    pareto: bool
    kept_nodes: list[str] = Field(default_factory=list)
    """Nodes kept out of INT8 by the automatic search."""
    int8_share: float | None = None
    """Share of quantizable nodes in INT8 (INT8 variants)."""
    perf: PerfReport
    accuracy: AccuracyReport
    mixed: MixedPrecisionResult | None = None
    gate: GateResult | None = None
    """The accuracy gate this variant's precision gets by default (or the spec's), checked on
    the held-out samples; a sweep lists a failing variant rather than stopping."""


class VariantFailure(FrozenReport):
    """A variant that could not be built or measured, with trtforge's error."""

    name: str
    code: str
    message: str
    hint: str


class SweepReport(FrozenReport):
    """Every variant of one model, measured the same way."""

    model: str
    model_sha256: str
    dataset_sha256: str
    calibration_samples: int
    """Samples behind the table (for a given TensorRT cache, which does not record them: 0)."""
    eval_samples: int
    backend: str
    backend_version: str
    backend_reason: str
    int8_weight_levels: int | None = None
    """The backend's INT8 weight levels (63: ONNX Runtime on an x86 CPU without VNNI)."""
    calibration: MethodSpec | None
    table_sha256: str | None
    table_given: bool = False
    """The table was passed in (``--table``), not calibrated by this sweep."""
    accuracy_metric: AccuracyMetric
    accuracy_higher_is_better: bool
    latency_stat: str = "p50"
    benchmark: BenchmarkOptions
    environment: dict[str, str] = Field(default_factory=dict)
    variants: list[VariantResult]
    failed: list[VariantFailure] = Field(default_factory=list)
    """Variants that raised a trtforge error (e.g. an unreachable ``auto`` budget)."""
    created_at: str
    seconds: float

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def pareto_front(self) -> list[str]:
        """Names of the variants on the front, fastest first."""
        front = [v for v in self.variants if v.pareto]
        return [v.name for v in sorted(front, key=lambda v: v.latency_p50_ms)]


def pareto_front(
    latencies_ms: Sequence[float], accuracies: Sequence[float], *, higher_is_better: bool = True
) -> list[bool]:
    """Per point, whether no other point is at least as fast and as accurate and better in one.

    NaN accuracy counts as the worst; equal points are all on the front.
    """
    if len(latencies_ms) != len(accuracies):
        raise ValueError("one accuracy per latency")
    sign = 1.0 if higher_is_better else -1.0
    good = [-math.inf if math.isnan(a) else sign * a for a in accuracies]
    lat = [math.inf if math.isnan(x) else x for x in latencies_ms]
    front = []
    for i in range(len(lat)):
        dominated = any(
            lat[j] <= lat[i] and good[j] >= good[i] and (lat[j] < lat[i] or good[j] > good[i])
            for j in range(len(lat))
        )
        front.append(not dominated)
    return front


def default_metric(accuracy: AccuracyReport, with_labels: bool) -> AccuracyMetric:
    """The metric a sweep compares on unless told: true accuracy with labels, else top-1
    agreement with FP32 (class scores), else cosine."""
    if with_labels and accuracy.metric(AccuracyMetric.ACCURACY) is not None:
        return AccuracyMetric.ACCURACY
    if accuracy.metric(AccuracyMetric.TOP1_AGREEMENT) is not None:
        return AccuracyMetric.TOP1_AGREEMENT
    return AccuracyMetric.COSINE


class Fp32Ratios(NamedTuple):
    """A variant against the FP32 one: ``speedup_vs_fp32`` and ``size_vs_fp32``."""

    speedup: float | None
    size: float | None


def ratios_vs_fp32(
    latencies_ms: Sequence[float], sizes_bytes: Sequence[int], fp32: int | None
) -> list[Fp32Ratios]:
    """Per variant, FP32's median latency over its own and its artifact's size over FP32's;
    ``fp32`` is the FP32 variant's index (None: no FP32 variant, no ratios). A ratio is None
    where its divisor is 0."""
    if len(latencies_ms) != len(sizes_bytes):
        raise ValueError("one size per latency")
    if fp32 is None:
        return [Fp32Ratios(None, None) for _ in latencies_ms]
    fp32_ms, fp32_size = latencies_ms[fp32], sizes_bytes[fp32]
    return [
        Fp32Ratios(
            speedup=fp32_ms / ms if ms > 0 else None,
            size=size / fp32_size if fp32_size > 0 else None,
        )
        for ms, size in zip(latencies_ms, sizes_bytes, strict=True)
    ]


# --- rendering --------------------------------------------------------------------------------


def _size(size_bytes: int) -> str:
    return (
        f"{size_bytes / 2**20:.2f} MiB" if size_bytes >= 2**20 else f"{size_bytes / 1024:.1f} KiB"
    )


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _calibration_words(report: SweepReport) -> str:
    if not report.table_given:
        return f"{report.calibration_samples} calibration"
    samples = f"{report.calibration_samples} samples" if report.calibration_samples else "cache"
    return f"a given calibration table ({samples}, sha256 {(report.table_sha256 or '')[:12]})"


def render_markdown(report: SweepReport) -> str:
    """The report as a Markdown table (one row per variant) plus the kept nodes of auto variants."""
    metric = report.accuracy_metric.value
    lines = [
        f"# Sweep of {report.model}",
        "",
        f"Backend {report.backend} {report.backend_version} ({report.backend_reason}); "
        f"{_calibration_words(report)} and {report.eval_samples} held-out samples; "
        f"latency = {report.latency_stat} over at least {report.benchmark.duration_s:g} s, "
        f"batch {report.benchmark.batch_size or 1}.",
        "",
        f"| variant | size | build + search s | p50 ms | p90 ms | p99 ms | throughput qps | {metric} "
        "| speedup vs fp32 | size vs fp32 | INT8 share | Pareto | accuracy gate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---|",
    ]
    for v in report.variants:
        lines.append(
            f"| {v.name} | {_size(v.size_bytes)} | {v.build_seconds + v.search_seconds:.2f} "
            f"| {v.latency_p50_ms:.3f} | {v.latency_p90_ms:.3f} | {v.latency_p99_ms:.3f} "
            f"| {v.throughput_qps:.1f} | {v.accuracy_value:.6g} "
            f"| {_opt(v.speedup_vs_fp32, '.2f')} | {_opt(v.size_vs_fp32, '.2f')} "
            f"| {_opt(v.int8_share, '.0%')} | {'yes' if v.pareto else ''} | {_gate_words(v)} |"
        )
    lines += ["", *fp32_notes(report)]
    lines += [f"Pareto front (fastest first): {', '.join(report.pareto_front)}.", ""]
    if report.failed:
        lines += ["## Failed variants", ""]
        lines += [f"- {f.name}: {f.message} {f.hint}".rstrip() for f in report.failed]
        lines.append("")
    for v in report.variants:
        if v.mixed is None:
            continue
        m = v.mixed
        lines += [
            f"## {v.name}",
            "",
            f"Budget {m.budget}: full INT8 gave {m.value_full_int8:.6g}; keeping "
            f"{len(m.kept_nodes)} of {m.quantizable_nodes} quantizable nodes out of INT8 reaches "
            f"{m.value_reached:.6g} ({m.evaluations} evaluations, {m.seconds:.1f} s).",
            "",
            *[f"- `{n}`" for n in m.kept_nodes],
            "",
        ]
    return "\n".join(lines)


def fp32_notes(report: SweepReport) -> list[str]:
    """Markdown lines: per variant whose speed or size against FP32 needs a reason, the ratios
    and the reason (:mod:`engines.fp32_notes`); no lines when none does."""
    notes = []
    for v in report.variants:
        if v.precision is Precision.FP32:
            continue
        facts = Fp32Facts.from_environment(
            report.backend, v.precision, report.int8_weight_levels, v.perf.environment
        )
        speedup, size = v.speedup_vs_fp32, v.size_vs_fp32
        slow = speedup is not None and speed_reason(speedup, facts) is not None
        large = size is not None and size_reason(facts) is not None
        if slow or large:
            words = [speed_note(speedup, facts)] if speedup is not None else []
            words += [size_note(size, facts) or ""] if size is not None else []
            notes.append(f"- {v.name}: " + "; ".join(words) + ".")
    return ["Against FP32:", "", *notes, ""] if notes else []


def _gate_words(variant: VariantResult) -> str:
    gate = variant.gate
    if gate is None or not gate.gate.enabled:
        return "-"
    if gate.passed:
        return f"passed ({gate.gate_text})"
    return "FAILED: " + "; ".join(str(f) for f in gate.failures)


def render_svg(report: SweepReport) -> str:
    """Latency against accuracy (front highlighted) and p50/p90/p99 latency per variant."""
    return render_chart_svg(
        report.model,
        report.accuracy_metric.value,
        [
            ChartRow(
                v.name,
                v.latency_p50_ms,
                v.latency_p90_ms,
                v.latency_p99_ms,
                v.accuracy_value,
                v.pareto,
            )
            for v in report.variants
        ],
    )


class ChartRow(NamedTuple):
    """One variant as the sweep chart draws it."""

    name: str
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    accuracy_value: float | None
    """None: not measured (the variant gets its latency bars only)."""
    pareto: bool


def render_chart_svg(model: str, accuracy_metric: str, rows: Sequence[ChartRow]) -> str:
    """The sweep chart of ``rows`` (``trtforge sweep``'s ``sweep.svg``; the service's sweeps draw
    the same from their builds' reports): latency against accuracy with the front highlighted,
    and p50/p90/p99 latency per variant."""
    width, height = 980.0, 420.0
    points = [
        ScatterPoint(r.name, r.latency_p50_ms, r.accuracy_value, highlighted=r.pareto)
        for r in rows
        if r.accuracy_value is not None
    ]
    groups = [
        BarGroup(r.name, (r.latency_p50_ms, r.latency_p90_ms, r.latency_p99_ms)) for r in rows
    ]
    body = [
        *scatter_panel(
            points,
            Box(0, 0, width / 2, height),
            title="Latency against accuracy (Pareto front in red)",
            x_label="p50 latency (ms)",
            y_label=accuracy_metric,
        ),
        *bars_panel(
            groups,
            ("p50", "p90", "p99"),
            Box(width / 2, 0, width / 2, height),
            title="Latency percentiles per variant",
            y_label="latency (ms)",
        ),
    ]
    return svg_document(width, height, body, title=f"Sweep of {model}")
