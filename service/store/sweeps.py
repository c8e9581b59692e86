"""Sweeps: one model built as several variants (precisions, accuracy budgets), compared.

A sweep is a set of normal builds, one per variant, each submitted through the queue like any
``POST /v1/builds`` (deduplicated by its cache key: a variant built before is reused; INT8
variants share one calibration table through the table cache). The sweep row records which
build is which variant; everything else is read from the builds when the sweep is read: its
status from theirs, and per measured variant (a build with a report, a failed accuracy gate
included) the latency, throughput, size and accuracy of the report, compared as ``trtforge
sweep`` compares them (:mod:`engines.sweep`): on p50 latency and one accuracy metric (true
accuracy with labels, else top-1 agreement with FP32 for class scores, else cosine), with the
Pareto front.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from engines.accuracy_report import AccuracyMetric, AccuracyReport, MetricBudget
from engines.errors import SpecError
from engines.perf_report import PerfReport
from engines.spec import Precision
from service.db.models import BuildRow, ModelRow, SweepRow
from service.errors import NotFoundError
from service.queue.base import JobQueue
from service.schemas import (
    BuildCreate,
    BuildReport,
    BuildStatus,
    ErrorInfo,
    SweepChart,
    SweepCreate,
    SweepPoint,
    SweepPublic,
    SweepStatus,
    SweepSummary,
    SweepVariant,
)
from service.store.builds import submit_build
from service.store.catalog import Page
from service.store.rows import newest_first, visible
from service.store.storage import Storage

__all__ = [
    "chart_svg",
    "create_sweep",
    "delete_sweep",
    "get_sweep",
    "list_sweeps",
    "sweep_public",
    "sweep_summary",
]


def create_sweep(
    session: Session,
    storage: Storage,
    queue: JobQueue,
    request: SweepCreate,
    project: str | None,
) -> SweepRow:
    """Submit one build per variant (each checked as ``POST /v1/builds`` checks it) and record
    the sweep. :class:`SpecError` (field ``variants`` or ``spec.precision``) for variants that
    cannot be read, repeat, or a spec that sets the precision the variants set."""
    from engines.sweep import parse_variants  # the CLI's reading of variant names

    if request.variants is not None and request.preset is not None:
        raise SpecError(
            "The sweep names both variants and a preset.",
            hint="Send either variants (a list) or preset.",
            field="variants",
        )
    if "precision" in request.spec.model_fields_set:
        raise SpecError(
            "spec.precision is set by each variant of a sweep.",
            hint='Leave spec.precision out; list the precisions in variants (e.g. ["fp16", '
            '"int8"]).',
            field="spec.precision",
        )
    variants = parse_variants(request.variant_texts)
    submitted: list[dict[str, str]] = []
    home = project
    for variant in variants:
        build_request = BuildCreate(
            model_id=request.model_id,
            dataset_id=request.dataset_id,
            spec=request.spec.model_copy(update={"precision": variant.precision}),
            calibration=request.calibration,
            benchmark=request.benchmark,
            accuracy=request.accuracy,
            target=request.target,
            eval_dataset_id=request.eval_dataset_id,
            labels=request.labels,
            accuracy_budget=variant.budget,
        )
        row, _ = submit_build(session, storage, queue, build_request, project)
        submitted.append({"name": variant.name, "build_id": row.id})
        home = row.project
    sweep = SweepRow(
        id=uuid.uuid4().hex,
        name=request.name,
        model_id=request.model_id,
        dataset_id=request.dataset_id,
        eval_dataset_id=request.eval_dataset_id,
        request=request.model_dump(mode="json"),
        variants=submitted,
        project=home,
    )
    session.add(sweep)
    session.commit()
    return sweep


def get_sweep(session: Session, sweep_id: str, project: str | None = None) -> SweepRow:
    row = visible(session.get(SweepRow, sweep_id), project)
    if row is None:
        raise NotFoundError(
            f"No sweep with id {sweep_id!r}.",
            hint="List sweeps with GET /v1/sweeps.",
            field="sweep_id",
        )
    return row


def list_sweeps(
    session: Session,
    limit: int,
    offset: int,
    *,
    model_id: str | None = None,
    project: str | None = None,
) -> Page[SweepRow]:
    query = select(SweepRow)
    if project is not None:
        query = query.where(SweepRow.project == project)
    if model_id is not None:
        query = query.where(SweepRow.model_id == model_id)
    return newest_first(session, query, SweepRow, limit, offset)


def delete_sweep(session: Session, sweep_id: str, project: str | None = None) -> None:
    """Forget the sweep; its builds stay (delete them with ``DELETE /v1/builds/{id}``)."""
    session.delete(get_sweep(session, sweep_id, project))
    session.commit()


# -- reading a sweep ------------------------------------------------------------------------------


def _builds(session: Session, rows: Sequence[SweepRow]) -> dict[str, BuildRow]:
    ids = {str(v["build_id"]) for row in rows for v in row.variants}
    if not ids:
        return {}
    return {b.id: b for b in session.scalars(select(BuildRow).where(BuildRow.id.in_(ids)))}


def _variants(row: SweepRow, builds: dict[str, BuildRow]) -> list[SweepVariant]:
    out = []
    for v in row.variants:
        build = builds.get(str(v["build_id"]))
        out.append(
            SweepVariant(
                name=str(v["name"]),
                build_id=str(v["build_id"]),
                status=BuildStatus(build.status) if build is not None else None,
                progress=build.progress if build is not None else 0.0,
            )
        )
    return out


def _status(variants: list[SweepVariant], builds: dict[str, BuildRow]) -> SweepStatus:
    statuses = [v.status for v in variants]
    if any(s is not None and not s.terminal for s in statuses):
        if all(s in (BuildStatus.QUEUED, None) for s in statuses):
            return SweepStatus.QUEUED
        return SweepStatus.RUNNING
    measured = sum(1 for v in variants if _measured(builds.get(v.build_id)))
    if measured == len(variants):
        return SweepStatus.SUCCEEDED
    return SweepStatus.FAILED if measured == 0 else SweepStatus.PARTIAL


def _measured(build: BuildRow | None) -> bool:
    return build is not None and BuildStatus(build.status).terminal and bool(build.report_sha256)


def _summary_fields(row: SweepRow, builds: dict[str, BuildRow]) -> dict[str, Any]:
    variants = _variants(row, builds)
    return {
        "id": row.id,
        "name": row.name,
        "status": _status(variants, builds),
        "model_id": row.model_id,
        "dataset_id": row.dataset_id,
        "eval_dataset_id": row.eval_dataset_id,
        "variants": variants,
        "created_at": row.created_at,
        "links": {"self": f"/v1/sweeps/{row.id}", "model": f"/v1/models/{row.model_id}"},
    }


def sweep_summary(session: Session, rows: Sequence[SweepRow]) -> list[SweepSummary]:
    """The listing's view of ``rows`` (statuses only), with one query for all their builds."""
    builds = _builds(session, rows)
    return [SweepSummary(**_summary_fields(row, builds)) for row in rows]


def sweep_public(session: Session, storage: Storage, row: SweepRow) -> SweepPublic:
    """The sweep with its measured variants (from their reports), front and chart data."""
    builds = _builds(session, [row])
    fields = _summary_fields(row, builds)
    request = SweepCreate.model_validate(row.request)
    measured = []
    failed = []
    for variant in fields["variants"]:
        build = builds.get(variant.build_id)
        measures = None
        if build is not None and build.report_sha256 and _measured(build):
            measures = _measures(storage, build.report_sha256)
        if build is not None and measures is not None:
            measured.append((variant, build, measures))
        elif build is None:
            failed.append(
                ErrorInfo(
                    code="deleted",
                    message=f"Build {variant.build_id[:12]} of variant {variant.name} was deleted.",
                    hint="Submit the sweep again to build it again.",
                    field=variant.name,
                )
            )
        elif BuildStatus(build.status).terminal:  # ended without a report
            failed.append(
                ErrorInfo(
                    code=build.error_code or build.status,
                    message=build.error_message
                    or f"Build {build.id[:12]} of variant {variant.name} ended {build.status}.",
                    hint=build.error_hint
                    or f"Submit its request again (GET /v1/builds/{build.id}; POST /v1/builds).",
                    field=variant.name,
                )
            )
    metric = _metric([m for _, _, m in measured], request.labels is not None)
    points = _points(measured, metric)
    on_front = sorted((p for p in points if p.pareto), key=lambda p: p.latency_p50_ms)
    front = [p.variant for p in on_front]
    higher = metric.higher_is_better if metric is not None else True
    chart = SweepChart(
        y=metric.value if metric is not None else None,
        higher_is_better=higher,
        points=[
            {
                "variant": p.variant,
                "build_id": p.build_id,
                "x": p.latency_p50_ms,
                "y": p.accuracy_value,
                "pareto": p.pareto,
            }
            for p in points
        ],
        front=front,
        latency=[
            {
                "variant": p.variant,
                "p50": p.latency_p50_ms,
                "p90": p.latency_p90_ms,
                "p99": p.latency_p99_ms,
            }
            for p in points
        ],
    )
    return SweepPublic(
        **fields,
        spec=request.spec,
        accuracy_metric=metric,
        accuracy_higher_is_better=higher,
        points=points,
        pareto_front=front,
        chart=chart,
        failed=failed,
    )


def chart_svg(session: Session, public: SweepPublic) -> str:
    """The sweep's chart as SVG, drawn as ``trtforge sweep`` draws ``sweep.svg``."""
    from engines.sweep_report import ChartRow, render_chart_svg

    model = session.get(ModelRow, public.model_id)
    title = (model.name or model.filename) if model is not None else public.model_id[:12]
    rows = [
        ChartRow(
            p.variant,
            p.latency_p50_ms,
            p.latency_p90_ms,
            p.latency_p99_ms,
            p.accuracy_value,
            p.pareto,
        )
        for p in public.points
    ]
    metric = public.accuracy_metric.value if public.accuracy_metric is not None else "accuracy"
    return render_chart_svg(title, metric, rows)


@dataclass(frozen=True)
class _Measures:
    """What a sweep reads from one build's report."""

    perf: PerfReport
    accuracy: AccuracyReport | None
    precision: Precision
    size_bytes: int
    gate_passed: bool | None
    kept_nodes: int
    budget: MetricBudget | None


def _measures(storage: Storage, sha256: str) -> _Measures | None:
    return _measures_at(str(storage.blob_path(sha256)))


@lru_cache(maxsize=256)
def _measures_at(path: str) -> _Measures | None:
    """A report's measures (reports are immutable blobs: cached by path = sha256); None for
    a report this server cannot read."""
    try:
        report = BuildReport.model_validate_json(Path(path).read_bytes())
    except (OSError, ValidationError):
        return None
    mixed = report.mixed_precision
    return _Measures(
        perf=report.performance,
        accuracy=report.accuracy,
        precision=report.spec.precision,
        size_bytes=report.artifact.size_bytes,
        gate_passed=report.gate.passed if report.gate is not None else None,
        kept_nodes=len(report.kept_nodes),
        budget=mixed.budget if mixed is not None else None,
    )


def _metric(measures: list[_Measures], with_labels: bool) -> AccuracyMetric | None:
    """As ``trtforge sweep`` chooses (:func:`engines.sweep_report.default_metric`), from the
    first measured accuracy; None where no variant measured one."""
    from engines.sweep_report import default_metric

    first = next((m.accuracy for m in measures if m.accuracy is not None), None)
    return None if first is None else default_metric(first, with_labels)


def _points(
    measured: list[tuple[SweepVariant, BuildRow, _Measures]], metric: AccuracyMetric | None
) -> list[SweepPoint]:
    from engines.sweep_report import pareto_front, ratios_vs_fp32

    usable = measured
    values = [
        m.accuracy.metric(metric) if metric is not None and m.accuracy is not None else None
        for _, _, m in usable
    ]
    latencies = [m.perf.latency.median_ms for _, _, m in usable]
    higher = metric.higher_is_better if metric is not None else True
    front = pareto_front(
        latencies, [math.nan if v is None else v for v in values], higher_is_better=higher
    )
    fp32 = next((i for i, (_, _, m) in enumerate(usable) if m.precision is Precision.FP32), None)
    vs_fp32 = ratios_vs_fp32(latencies, [m.size_bytes for _, _, m in usable], fp32)
    points = []
    for (variant, build, m), value, on_front, ratios in zip(
        usable, values, front, vs_fp32, strict=True
    ):
        lat = m.perf.latency
        points.append(
            SweepPoint(
                variant=variant.name,
                build_id=build.id,
                precision=m.precision,
                budget=m.budget,
                latency_mean_ms=lat.mean_ms,
                latency_p50_ms=lat.median_ms,
                latency_p90_ms=lat.p90_ms,
                latency_p95_ms=lat.p95_ms,
                latency_p99_ms=lat.p99_ms,
                throughput_qps=m.perf.throughput_qps,
                size_bytes=m.size_bytes,
                accuracy_value=value,
                speedup_vs_fp32=ratios.speedup,
                size_vs_fp32=ratios.size,
                gate_passed=m.gate_passed,
                kept_nodes=m.kept_nodes,
                pareto=on_front,
            )
        )
    return points
