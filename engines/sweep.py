"""Variant comparison: build a model at several precisions, measure each, and report the trade-off.

A sweep splits the dataset once into calibration and held-out evaluation samples (the same rule
as :meth:`CalibrationDataset.split`), or takes a separate evaluation dataset and calibrates on all
of the first; it calibrates once (or takes a given table) and reuses the table for every INT8
variant, then per variant: builds the artifact (:func:`engines.build.build_artifact`),
benchmarks it on held-out samples (:func:`engines.benchmark.benchmark`) and compares it with the
FP32 model (ONNX Runtime on the original, run once per batch) on the held-out samples
(:func:`engines.accuracy.compare`).

Variants: ``fp32``, ``fp16``, ``int8``, ``int8-fp16``, and ``auto:METRIC:VALUE`` (or
``auto:int8-fp16:METRIC:VALUE``): automatic mixed precision, the fewest most sensitive nodes kept
out of INT8 so that the budget is met on the held-out samples (:mod:`engines.mixed`).

The report (:mod:`engines.sweep_report`: speedups, the Pareto front, Markdown and SVG) compares
variants on one latency statistic (the median, p50) and one accuracy metric: true top-1 accuracy
with labels, else top-1 agreement with FP32 for class-score outputs, else cosine similarity.

Written to ``out_dir``: the artifacts, ``sweep.json`` (:class:`SweepReport`), ``sweep.md`` and
``sweep.svg`` (latency against accuracy with the front highlighted, and p50/p90/p99 latency per
variant), each through a temporary file and a rename.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from calibrators.data import CalibrationDataset
from calibrators.spec import MethodSpec, method_spec
from calibrators.table import CalibrationTable
from core.errors import TrtforgeError
from core.files import write_atomically
from engines.accuracy_report import AccuracyMetric, AccuracyReport, MetricBudget
from engines.backends.base import ProgressFn, report_progress
from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.errors import SpecError
from engines.frozen import FrozenReport
from engines.gate import GateResult
from engines.mixed import MixedPrecisionResult
from engines.perf_report import BenchmarkOptions, PerfReport
from engines.spec import BackendName, BuildSpec, Precision
from engines.sweep_report import (
    SweepReport,
    VariantFailure,
    VariantResult,
    default_metric,
    pareto_front,
    ratios_vs_fp32,
    render_markdown,
    render_svg,
)
from engines.variants import MemoizedRunner
from engines.workflow import Split, Workflow

__all__ = ["SweepReport", "Variant", "parse_variants", "render_markdown", "sweep"]
"""``SweepReport`` and ``render_markdown`` live in :mod:`engines.sweep_report`; they are
re-exported here for callers that import them from here."""


class Variant(FrozenReport):
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


# --- the sweep --------------------------------------------------------------------------------


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
    gate: GateResult | None


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
    eval_dataset: CalibrationDataset | None = None,
    table: CalibrationTable | None = None,
    base_spec: BuildSpec | None = None,
    accuracy_metric: AccuracyMetric | None = None,
    eval_batch_size: int = 16,
    mixed_max_nodes: int | None = None,
    progress: ProgressFn | None = None,
) -> SweepReport:
    """Build, benchmark and compare each variant; write the report files into ``out_dir``.

    ``labels[i]`` is the class of dataset sample ``i`` (all samples; the held-out ones are
    picked out), or of ``eval_dataset`` sample ``i`` when that is given. With ``eval_dataset``
    every sample of ``dataset`` calibrates and ``eval_fraction`` is not used. ``table`` skips
    calibration (it must name tensors of this model). ``base_spec`` supplies everything but the precision and backend (calibration
    method, keep rules, profiles). ``accuracy_metric`` overrides the module docstring's choice.
    ``mixed_max_nodes`` bounds the sensitivity evaluations of ``auto`` variants. A variant that
    raises a trtforge error is listed in :attr:`SweepReport.failed` and the others go on; when
    every variant fails, the first error is raised.
    """
    start = time.perf_counter()
    model_path = Path(model_path)
    parsed = [v if isinstance(v, Variant) else Variant.parse(v) for v in variants]
    parse_variants([v.name for v in parsed])
    if eval_dataset is None and not 0 < eval_fraction < 1:
        raise SpecError(
            f"eval_fraction must be in (0, 1), got {eval_fraction}.",
            hint="A sweep needs held-out samples: e.g. --eval-fraction 0.2.",
            field="eval_fraction",
        )
    base = (base_spec or BuildSpec()).model_copy(update={"backend": backend})
    flow = Workflow(model_path, base)
    split = flow.split(
        dataset, eval_fraction=eval_fraction, seed=seed, eval_dataset=eval_dataset, labels=labels
    )
    needs_table = any(v.precision.uses_int8 for v in parsed)
    calibrated = None
    if table is not None or needs_table:
        report_progress(progress, "calibrating", 0.0)
        calibrated = flow.calibrate(
            split.calibration,
            table=table,
            held_out=split.evaluation if split.held_out else None,
            force=True,
        )
    ctx = _Context(
        flow=flow,
        table=calibrated.table if calibrated is not None else None,
        evaluation=split.evaluation,
        labels=split.eval_labels,
        options=benchmark_options or BenchmarkOptions(),
        out_dir=Path(out_dir),
        batch_size=eval_batch_size,
        max_nodes=mixed_max_nodes,
    )
    try:
        return _sweep_variants(
            parsed, ctx, split, dataset, table, start, progress, accuracy_metric
        )
    finally:
        flow.close()


def _sweep_variants(
    parsed: list[Variant],
    ctx: _Context,
    split: Split,
    dataset: CalibrationDataset,
    table: CalibrationTable | None,
    start: float,
    progress: ProgressFn | None,
    accuracy_metric: AccuracyMetric | None,
) -> SweepReport:
    flow = ctx.flow
    model_path, base = flow.model_path, flow.spec
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    measured: list[_Measured] = []
    failed: list[tuple[Variant, TrtforgeError]] = []
    with MemoizedRunner(OnnxRuntimeRunner(model_path)) as reference:
        for i, variant in enumerate(parsed):
            report_progress(progress, f"variant {variant.name}", (i + 0.1) / len(parsed))
            try:
                measured.append(_measure(variant, ctx, reference))
            except TrtforgeError as exc:
                failed.append((variant, exc))
    if not measured:
        raise failed[0][1]
    metric = accuracy_metric or default_metric(measured[0].accuracy, ctx.labels is not None)
    report = SweepReport(
        model=model_path.name,
        model_sha256=flow.model_sha256,  # hashed once, for the table key too
        dataset_sha256=dataset.digest,
        calibration_samples=ctx.table.samples if ctx.table is not None else len(split.calibration),
        eval_samples=len(split.evaluation),
        backend=flow.backend.name,
        backend_version=flow.backend.version(),
        backend_reason=flow.backend_reason,
        int8_weight_levels=flow.backend.int8_weight_levels(),
        calibration=_table_method(table)
        if table is not None
        else (base.calibration if ctx.table is not None else None),
        table_sha256=ctx.table.digest if ctx.table is not None else None,
        table_given=table is not None,
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
    write_atomically(ctx.out_dir / "sweep.json", report.model_dump_json(indent=2))
    write_atomically(ctx.out_dir / "sweep.md", render_markdown(report))
    write_atomically(ctx.out_dir / "sweep.svg", render_svg(report))
    report_progress(progress, "done", 1.0)
    return report


@dataclass
class _Context:
    """What every variant of one sweep shares."""

    flow: Workflow
    table: CalibrationTable | None
    evaluation: CalibrationDataset
    labels: np.ndarray | None
    options: BenchmarkOptions
    out_dir: Path
    batch_size: int
    max_nodes: int | None


def _table_method(table: CalibrationTable) -> MethodSpec | None:
    """The method a given table was computed with, when it says (TensorRT caches do not)."""
    if table.method is None:
        return None
    percentile = table.parameters.get("percentile")
    try:
        return method_spec(
            table.method, percentile=None if percentile is None else float(percentile)
        )
    except ValueError:
        return method_spec(table.method)


def _measure(variant: Variant, ctx: _Context, reference: MemoizedRunner) -> _Measured:
    flow = ctx.flow
    spec = flow.spec.model_copy(update={"precision": variant.precision})
    table = ctx.table if spec.precision.uses_int8 else None
    mixed = None
    search_start = time.perf_counter()
    if variant.budget is not None and ctx.table is not None:
        mixed = flow.search_budget(
            ctx.table,
            ctx.evaluation,
            variant.budget,
            labels=ctx.labels,
            max_nodes=ctx.max_nodes,
            spec=spec,
        )
        spec = mixed.apply_to(spec)
    search_seconds = time.perf_counter() - search_start if mixed is not None else 0.0
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", variant.name).strip("-") + flow.artifact_suffix
    artifact = flow.build(ctx.out_dir / name, table, spec=spec)
    perf = flow.benchmark(artifact, ctx.evaluation, ctx.options)
    accuracy = flow.evaluate(
        artifact,
        ctx.evaluation,
        labels=ctx.labels,
        budget=variant.budget,
        batch_size=ctx.batch_size,
        reference=reference,
    )
    gate = flow.gate(accuracy, spec=spec) if spec.precision is not Precision.FP32 else None
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
        gate=gate,
    )


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
    fp32 = next((i for i, m in enumerate(measured) if m.variant.precision is Precision.FP32), None)
    vs_fp32 = ratios_vs_fp32(latencies, [m.size_bytes for m in measured], fp32)
    results = []
    for m, value, on_front, ratios in zip(measured, values, front, vs_fp32, strict=True):
        lat = m.perf.latency
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
                speedup_vs_fp32=ratios.speedup,
                size_vs_fp32=ratios.size,
                pareto=on_front,
                kept_nodes=list(m.mixed.kept_nodes) if m.mixed is not None else [],
                int8_share=m.int8_share,
                perf=m.perf,
                accuracy=m.accuracy,
                mixed=m.mixed,
                gate=m.gate,
            )
        )
    return results
