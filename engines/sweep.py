"""Variant comparison: build a model at several precisions, measure each, and report the trade-off.

A sweep splits the dataset once into calibration and held-out evaluation samples (the same rule
as :meth:`CalibrationDataset.split`), calibrates once on the first part and reuses the table for
every INT8 variant, then per variant: builds the artifact (:func:`engines.build.build_artifact`),
benchmarks it on held-out samples (:func:`engines.benchmark.benchmark`) and compares it with the
FP32 model (ONNX Runtime on the original, run once per batch) on the held-out samples
(:func:`engines.accuracy.compare`).

Variants: ``fp32``, ``fp16``, ``int8``, ``int8-fp16``, and ``auto:METRIC:VALUE`` (or
``auto:int8-fp16:METRIC:VALUE``): automatic mixed precision, the fewest most sensitive nodes kept
out of INT8 so that the budget is met on the held-out samples (:mod:`engines.mixed`).

The report compares variants on one latency statistic (the median, p50) and one accuracy metric:
true top-1 accuracy with labels, else top-1 agreement with FP32 for class-score outputs, else
cosine similarity. ``speedup_vs_fp32`` is the FP32 variant's median latency over the variant's.
A variant is on the *Pareto front* when no other variant is at least as fast and at least as
accurate, and strictly better in one of the two (:func:`pareto_front`).

Written to ``out_dir``: the artifacts, ``sweep.json`` (:class:`SweepReport`), ``sweep.md`` and
``sweep.svg`` (latency against accuracy with the front highlighted, and p50/p90/p99 latency per
variant), each through a temporary file and a rename.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset, model_input_specs
from calibrators.errors import TrtforgeError
from calibrators.methods import MethodSpec
from calibrators.onnxio import load_onnx
from calibrators.table import CalibrationTable
from engines.accuracy import AccuracyMetric, AccuracyReport, MetricBudget, compare
from engines.artifacts import sha256_file
from engines.backends.base import ProgressFn
from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.benchmark import BenchmarkOptions, PerfReport, benchmark
from engines.build import build_artifact, select_backend
from engines.charts import BarGroup, Box, ScatterPoint, bars_panel, scatter_panel, svg_document
from engines.errors import SpecError
from engines.mixed import MixedPrecisionResult, search_mixed_precision
from engines.sensitivity import MemoizedRunner
from engines.spec import BackendName, BuildSpec, Precision

__all__ = [
    "SweepReport",
    "Variant",
    "VariantFailure",
    "VariantResult",
    "pareto_front",
    "parse_variants",
    "render_markdown",
    "render_svg",
    "sweep",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")


class Variant(_Frozen):
    """One build of a sweep: a precision, and for ``auto`` variants an accuracy budget."""

    name: str
    precision: Precision
    budget: MetricBudget | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``fp32``, ``fp16``, ``int8``, ``int8-fp16``, ``auto:METRIC:VALUE`` or
        ``auto:PRECISION:METRIC:VALUE`` (PRECISION int8 or int8-fp16; default int8)."""
        name = text.strip()
        parts = name.split(":")
        if parts[0] != "auto":
            try:
                return cls(name=name, precision=Precision(name))
            except ValueError:
                raise SpecError(
                    f"Unknown sweep variant {text!r}.",
                    hint="Use fp32, fp16, int8, int8-fp16 or auto:METRIC:VALUE "
                    "(e.g. auto:cosine:0.999).",
                    field="variants",
                ) from None
        precision = Precision.INT8
        if len(parts) == 4:
            if parts[1] not in (Precision.INT8.value, Precision.INT8_FP16.value):
                raise SpecError(
                    f"Variant {text!r}: automatic mixed precision starts from int8 or int8-fp16, "
                    f"not {parts[1]!r}.",
                    hint="Write auto:int8-fp16:METRIC:VALUE or auto:METRIC:VALUE.",
                    field="variants",
                )
            precision = Precision(parts[1])
        elif len(parts) != 3:
            raise SpecError(
                f"Cannot read the variant {text!r}.",
                hint="Write auto:METRIC:VALUE, e.g. auto:cosine:0.999 or auto:top1_agreement:0.99.",
                field="variants",
            )
        budget = MetricBudget.parse(":".join(parts[-2:]))
        return cls(name=name, precision=precision, budget=budget)


def parse_variants(texts: Sequence[str]) -> list[Variant]:
    """Parse variant names; :class:`SpecError` for unknown or repeated ones, or none at all."""
    variants = [Variant.parse(t) for t in texts if t.strip()]
    if not variants:
        raise SpecError(
            "No variants to sweep.", hint="e.g. --variants fp32,fp16,int8", field="variants"
        )
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SpecError(f"Variant(s) {', '.join(repeated)} given twice.", field="variants")
    return variants


class VariantResult(_Frozen):
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
    pareto: bool
    kept_nodes: list[str] = Field(default_factory=list)
    """Nodes kept out of INT8 by the automatic search."""
    int8_share: float | None = None
    """Share of quantizable nodes in INT8 (INT8 variants)."""
    perf: PerfReport
    accuracy: AccuracyReport
    mixed: MixedPrecisionResult | None = None


class VariantFailure(_Frozen):
    """A variant that could not be built or measured, with trtforge's error."""

    name: str
    code: str
    message: str
    hint: str


class SweepReport(_Frozen):
    """Every variant of one model, measured the same way."""

    model: str
    model_sha256: str
    dataset_sha256: str
    calibration_samples: int
    eval_samples: int
    backend: str
    backend_version: str
    backend_reason: str
    calibration: MethodSpec | None
    table_sha256: str | None
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


# --- the sweep --------------------------------------------------------------------------------


def _split_indices(
    data: CalibrationDataset, eval_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(calibration, evaluation) sample positions; a sweep needs held-out samples."""
    if not 0 < eval_fraction < 1:
        raise SpecError(
            f"eval_fraction must be in (0, 1), got {eval_fraction}.",
            hint="A sweep needs held-out samples: e.g. --eval-fraction 0.2.",
            field="eval_fraction",
        )
    return data.split_indices(eval_fraction, seed)


@dataclass(frozen=True)
class _Measured:
    """One variant before the cross-variant numbers (speedup, front) are known."""

    variant: Variant
    artifact: str
    sha256: str
    size_bytes: int
    build_seconds: float
    search_seconds: float
    perf: PerfReport
    accuracy: AccuracyReport
    mixed: MixedPrecisionResult | None
    int8_share: float | None


def sweep(
    model_path: Path,
    dataset: CalibrationDataset,
    variants: Sequence[str | Variant],
    *,
    out_dir: Path,
    backend: BackendName = BackendName.AUTO,
    eval_fraction: float = 0.2,
    seed: int = 0,
    benchmark_options: BenchmarkOptions | None = None,
    labels: np.ndarray | None = None,
    base_spec: BuildSpec | None = None,
    accuracy_metric: AccuracyMetric | None = None,
    eval_batch_size: int = 16,
    mixed_max_nodes: int | None = None,
    progress: ProgressFn | None = None,
) -> SweepReport:
    """Build, benchmark and compare each variant; write the report files into ``out_dir``.

    ``labels[i]`` is the class of dataset sample ``i`` (all samples; the held-out ones are
    picked out). ``base_spec`` supplies everything but the precision and backend (calibration
    method, keep rules, profiles). ``accuracy_metric`` overrides the module docstring's choice.
    ``mixed_max_nodes`` bounds the sensitivity evaluations of ``auto`` variants. A variant that
    raises a trtforge error is listed in :attr:`SweepReport.failed` and the others go on; when
    every variant fails, the first error is raised.
    """
    start = time.perf_counter()
    model_path = Path(model_path)
    parsed = [v if isinstance(v, Variant) else Variant.parse(v) for v in variants]
    parse_variants([v.name for v in parsed])
    model = load_onnx(model_path, load_external_data=False)
    data = dataset.validate(model_input_specs(model))
    del model
    cal_idx, eval_idx = _split_indices(data, eval_fraction, seed)
    builder, reason = select_backend(backend)
    ctx = _Context(
        model_path=model_path,
        base=(base_spec or BuildSpec()).model_copy(update={"backend": backend}),
        table=None,
        evaluation=data.subset(eval_idx),
        labels=None if labels is None else _eval_labels(labels, len(data), eval_idx),
        options=benchmark_options or BenchmarkOptions(),
        out_dir=Path(out_dir),
        suffix=".engine" if builder.name == "tensorrt" else ".onnx",
        batch_size=eval_batch_size,
        max_nodes=mixed_max_nodes,
    )
    if any(v.precision.uses_int8 for v in parsed):
        _report(progress, "calibrating", 0.0)
        ctx.table = calibrate(
            model_path, data.subset(cal_idx), ctx.base.calibration, histogram=ctx.base.histogram
        )
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    measured: list[_Measured] = []
    failed: list[tuple[Variant, TrtforgeError]] = []
    with MemoizedRunner(OnnxRuntimeRunner(model_path)) as reference:
        for i, variant in enumerate(parsed):
            _report(progress, f"variant {variant.name}", (i + 0.1) / len(parsed))
            try:
                measured.append(_measure(variant, ctx, reference))
            except TrtforgeError as exc:
                failed.append((variant, exc))
    if not measured:
        raise failed[0][1]
    metric = accuracy_metric or _default_metric(measured[0].accuracy, ctx.labels is not None)
    report = SweepReport(
        model=model_path.name,
        model_sha256=sha256_file(model_path),
        dataset_sha256=data.digest,
        calibration_samples=len(cal_idx),
        eval_samples=len(eval_idx),
        backend=builder.name,
        backend_version=builder.version(),
        backend_reason=reason,
        calibration=ctx.base.calibration if ctx.table is not None else None,
        table_sha256=ctx.table.digest if ctx.table is not None else None,
        accuracy_metric=metric,
        accuracy_higher_is_better=metric.higher_is_better,
        benchmark=ctx.options,
        environment=dict(measured[0].perf.environment),
        variants=_results(measured, metric),
        failed=[
            VariantFailure(name=v.name, code=e.code, message=e.message, hint=e.hint)
            for v, e in failed
        ],
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - start,
    )
    _write_text(ctx.out_dir / "sweep.json", report.model_dump_json(indent=2))
    _write_text(ctx.out_dir / "sweep.md", render_markdown(report))
    _write_text(ctx.out_dir / "sweep.svg", render_svg(report))
    _report(progress, "done", 1.0)
    return report


@dataclass
class _Context:
    """What every variant of one sweep shares."""

    model_path: Path
    base: BuildSpec
    table: CalibrationTable | None
    evaluation: CalibrationDataset
    labels: np.ndarray | None
    options: BenchmarkOptions
    out_dir: Path
    suffix: str
    batch_size: int
    max_nodes: int | None


def _report(progress: ProgressFn | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, fraction)


def _eval_labels(labels: np.ndarray, total: int, eval_idx: list[int]) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != total:
        raise SpecError(
            f"{len(array)} labels for a dataset of {total} samples.",
            hint="Give one class index per dataset sample, in the dataset's order.",
            field="labels",
        )
    return array[eval_idx]


def _measure(variant: Variant, ctx: _Context, reference: MemoizedRunner) -> _Measured:
    spec = ctx.base.model_copy(update={"precision": variant.precision})
    table = ctx.table if spec.precision.uses_int8 else None
    mixed = None
    search_start = time.perf_counter()
    if variant.budget is not None and ctx.table is not None:
        mixed = search_mixed_precision(
            ctx.model_path,
            ctx.table,
            spec,
            ctx.evaluation,
            variant.budget,
            labels=ctx.labels,
            max_nodes=ctx.max_nodes,
        )
        spec = mixed.apply_to(spec)
    search_seconds = time.perf_counter() - search_start if mixed is not None else 0.0
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", variant.name).strip("-") + ctx.suffix
    artifact = build_artifact(ctx.model_path, spec, table, ctx.out_dir / name)
    builder, _ = select_backend(spec.backend)
    with builder.load(artifact.path) as runner:
        perf = benchmark(runner, ctx.evaluation, ctx.options)
        accuracy = compare(
            reference,
            runner,
            ctx.evaluation,
            batch_size=ctx.batch_size,
            labels=ctx.labels,
            budget=variant.budget,
        )
    share = None
    if spec.precision.uses_int8:
        share = mixed.int8_share if mixed is not None else 1.0
    return _Measured(
        variant=variant,
        artifact=artifact.path.name,
        sha256=artifact.metadata.sha256,
        size_bytes=artifact.metadata.size_bytes,
        build_seconds=artifact.metadata.build_seconds,
        search_seconds=search_seconds,
        perf=perf,
        accuracy=accuracy,
        mixed=mixed,
        int8_share=share,
    )


def _default_metric(accuracy: AccuracyReport, with_labels: bool) -> AccuracyMetric:
    if with_labels and accuracy.metric(AccuracyMetric.ACCURACY) is not None:
        return AccuracyMetric.ACCURACY
    if accuracy.metric(AccuracyMetric.TOP1_AGREEMENT) is not None:
        return AccuracyMetric.TOP1_AGREEMENT
    return AccuracyMetric.COSINE


def _results(measured: list[_Measured], metric: AccuracyMetric) -> list[VariantResult]:
    values = []
    for m in measured:
        value = m.accuracy.metric(metric)
        if value is None:
            raise SpecError(
                f"Variant {m.variant.name} reports no {metric.value}.",
                hint="Choose an accuracy metric every output has, e.g. cosine.",
                field="accuracy_metric",
            )
        values.append(value)
    latencies = [m.perf.latency.median_ms for m in measured]
    front = pareto_front(latencies, values, higher_is_better=metric.higher_is_better)
    fp32 = next((m for m in measured if m.variant.precision is Precision.FP32), None)
    results = []
    for m, value, on_front in zip(measured, values, front, strict=True):
        lat = m.perf.latency
        speedup = None
        if fp32 is not None and lat.median_ms > 0:
            speedup = fp32.perf.latency.median_ms / lat.median_ms
        results.append(
            VariantResult(
                name=m.variant.name,
                precision=m.variant.precision,
                budget=m.variant.budget,
                artifact=m.artifact,
                artifact_sha256=m.sha256,
                size_bytes=m.size_bytes,
                build_seconds=m.build_seconds,
                search_seconds=m.search_seconds,
                latency_mean_ms=lat.mean_ms,
                latency_p50_ms=lat.median_ms,
                latency_p90_ms=lat.p90_ms,
                latency_p95_ms=lat.p95_ms,
                latency_p99_ms=lat.p99_ms,
                throughput_qps=m.perf.throughput_qps,
                accuracy_value=value,
                speedup_vs_fp32=speedup,
                pareto=on_front,
                kept_nodes=list(m.mixed.kept_nodes) if m.mixed is not None else [],
                int8_share=m.int8_share,
                perf=m.perf,
                accuracy=m.accuracy,
                mixed=m.mixed,
            )
        )
    return results


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        Path(tmp).chmod(0o644)  # mkstemp creates 0600; reports are meant to be read
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- rendering --------------------------------------------------------------------------------


def _size(size_bytes: int) -> str:
    return (
        f"{size_bytes / 2**20:.2f} MiB" if size_bytes >= 2**20 else f"{size_bytes / 1024:.1f} KiB"
    )


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_markdown(report: SweepReport) -> str:
    """The report as a Markdown table (one row per variant) plus the kept nodes of auto variants."""
    metric = report.accuracy_metric.value
    lines = [
        f"# Sweep of {report.model}",
        "",
        f"Backend {report.backend} {report.backend_version} ({report.backend_reason}); "
        f"{report.calibration_samples} calibration and {report.eval_samples} held-out samples; "
        f"latency = {report.latency_stat} over at least {report.benchmark.duration_s:g} s, "
        f"batch {report.benchmark.batch_size or 1}.",
        "",
        f"| variant | size | build + search s | p50 ms | p90 ms | p99 ms | throughput qps | {metric} "
        "| speedup vs fp32 | INT8 share | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for v in report.variants:
        lines.append(
            f"| {v.name} | {_size(v.size_bytes)} | {v.build_seconds + v.search_seconds:.2f} "
            f"| {v.latency_p50_ms:.3f} | {v.latency_p90_ms:.3f} | {v.latency_p99_ms:.3f} "
            f"| {v.throughput_qps:.1f} | {v.accuracy_value:.6g} "
            f"| {_opt(v.speedup_vs_fp32, '.2f')} | {_opt(v.int8_share, '.0%')} "
            f"| {'yes' if v.pareto else ''} |"
        )
    lines += ["", f"Pareto front (fastest first): {', '.join(report.pareto_front)}.", ""]
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


def render_svg(report: SweepReport) -> str:
    """Latency against accuracy (front highlighted) and p50/p90/p99 latency per variant."""
    width, height = 980.0, 420.0
    points = [
        ScatterPoint(v.name, v.latency_p50_ms, v.accuracy_value, highlighted=v.pareto)
        for v in report.variants
    ]
    groups = [
        BarGroup(v.name, (v.latency_p50_ms, v.latency_p90_ms, v.latency_p99_ms))
        for v in report.variants
    ]
    body = [
        *scatter_panel(
            points,
            Box(0, 0, width / 2, height),
            title="Latency against accuracy (Pareto front in red)",
            x_label="p50 latency (ms)",
            y_label=report.accuracy_metric.value,
        ),
        *bars_panel(
            groups,
            ("p50", "p90", "p99"),
            Box(width / 2, 0, width / 2, height),
            title="Latency percentiles per variant",
            y_label="latency (ms)",
        ),
    ]
    return svg_document(width, height, body, title=f"Sweep of {report.model}")
