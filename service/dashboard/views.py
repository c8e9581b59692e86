"""What the dashboard's pages show, computed from build rows and report documents: a build's
headline numbers, the data behind its charts, one page of its calibration table, a comparison.

Reports are immutable blobs, so a parsed report is cached by its sha256. Chart data are plain
dicts (Chart.js's ``{labels, datasets}``), embedded in pages as JSON.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibrators.table import CalibrationTable
from engines.accuracy_report import AccuracyMetric
from engines.sensitivity_report import SensitivityReport
from engines.stages import Stage
from service.schemas import BuildPublic, BuildStatus
from service.store.storage import Storage

__all__ = [
    "PERCENTILES",
    "BuildSummary",
    "CalibrationPage",
    "CompareRow",
    "StageView",
    "accuracy_chart",
    "calibration_page",
    "compare_rows",
    "json_for_script",
    "latency_chart",
    "load_report",
    "sensitivity_chart",
    "stages_of",
    "stored_report",
    "summary_of",
]

PERCENTILES = (
    ("min", "min_ms"),
    ("p50", "median_ms"),
    ("mean", "mean_ms"),
    ("p90", "p90_ms"),
    ("p95", "p95_ms"),
    ("p99", "p99_ms"),
    ("max", "max_ms"),
)
COLLAPSED_COSINE = 0.9
"""Below this cosine an output is called collapsed: the page marks it in words."""
_STAGE_ORDER = (Stage.CALIBRATE, Stage.BUILD, Stage.BENCHMARK, Stage.EVALUATE)


def json_for_script(value: Any) -> str:
    """``value`` as JSON safe inside ``<script type="application/json">`` (no ``</``)."""
    text = json.dumps(value, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@functools.lru_cache(maxsize=64)  # reports with per-tensor sections reach megabytes
def _read_report(path: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_bytes())
    return data


def load_report(blob: Path | None) -> dict[str, Any] | None:
    """The report document at ``blob`` (None when absent or unreadable)."""
    if blob is None:
        return None
    try:
        return _read_report(str(blob))
    except (OSError, ValueError):
        return None


def stored_report(storage: Storage, sha256: str | None) -> dict[str, Any] | None:
    """The report stored as blob ``sha256`` (None for a build without one, or unreadable)."""
    return load_report(storage.blob_path(sha256)) if sha256 else None


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass(frozen=True)
class BuildSummary:
    """A finished build's headline numbers (None where not measured)."""

    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_qps: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    gate: str | None = None
    """``passed``, ``failed``, ``none`` (no budgets), or None (not evaluated)."""
    gate_text: str = ""
    size_bytes: int | None = None

    @property
    def collapsed(self) -> bool:
        return self.min_cosine is not None and self.min_cosine < COLLAPSED_COSINE


def summary_of(build: BuildPublic, report: dict[str, Any] | None) -> BuildSummary:
    """The headline numbers of ``build`` (from its report when it has one)."""
    gated = build.error is not None and build.error.code == "accuracy_gate_failed"
    size = build.artifact.size_bytes if build.artifact else None
    if report is None:
        return BuildSummary(gate="failed" if gated else None, size_bytes=size)
    perf = report.get("performance") or {}
    latency = perf.get("latency") or {}
    outputs = (report.get("accuracy") or {}).get("outputs") or []
    cosines = [c for o in outputs if (c := _finite(o.get("min_cosine_similarity"))) is not None]
    sqnrs = [s for o in outputs if (s := _finite(o.get("sqnr_db"))) is not None]
    gate = report.get("gate")
    verdict = None
    if gated:
        verdict = "failed"
    elif gate:
        budgets = (gate.get("gate") or {}).get("budgets") or []
        verdict = "none" if not budgets else ("passed" if gate.get("passed") else "failed")
    return BuildSummary(
        p50_ms=_finite(latency.get("median_ms")),
        p99_ms=_finite(latency.get("p99_ms")),
        throughput_qps=_finite(perf.get("throughput_qps")),
        min_cosine=min(cosines) if cosines else None,
        min_sqnr_db=min(sqnrs) if sqnrs else None,
        gate=verdict,
        gate_text=str(gate.get("gate_text", "")) if gate else "",
        size_bytes=size,
    )


@dataclass(frozen=True)
class StageView:
    name: str
    state: str
    """``done``, ``running``, ``pending``, ``failed`` or ``skipped``."""
    seconds: float | None


def stages_of(build: BuildPublic) -> list[StageView]:
    """The pipeline's stages with where the build is (the timeline on the build page)."""
    views = []
    for stage in _STAGE_ORDER:
        seconds = build.stage_seconds.get(stage.value)
        if stage == build.stage and build.status is not BuildStatus.SUCCEEDED:
            state = "failed" if build.status.terminal else "running"
        elif seconds is not None:
            state = "done"
        else:
            state = "skipped" if build.status.terminal else "pending"
        views.append(StageView(stage.value, state, seconds))
    return views


def latency_chart(report: dict[str, Any]) -> dict[str, Any]:
    """Latency percentiles (ms) of every timing the benchmark measured."""
    perf = report.get("performance") or {}
    host = perf.get("timing") == "host"
    names = ["latency"] if host else ["latency", "gpu_compute", "enqueue"]
    datasets = []
    for name in names:
        timing = perf.get(name) or {}
        values = [_finite(timing.get(key)) for _, key in PERCENTILES]
        if any(v for v in values):
            datasets.append({"label": f"{name} (ms)", "data": values})
    return {"labels": [label for label, _ in PERCENTILES], "datasets": datasets}


def accuracy_chart(report: dict[str, Any]) -> dict[str, Any]:
    """Per output, against FP32: the gate's first metric with its threshold (the page's script
    draws it as a line across the chart), outputs that fail the gate marked in their label and
    hatched; without a gate, the mean and worst-sample cosine."""
    outputs = (report.get("accuracy") or {}).get("outputs") or []
    labels: list[Any] = [o.get("name", "?") for o in outputs]
    gate = report.get("gate") or {}
    budgets = (gate.get("gate") or {}).get("budgets") or []
    metric = _metric(budgets[0].get("metric")) if budgets else None
    if metric is None:
        return {
            "labels": labels,
            "datasets": [
                {"label": "cosine", "data": [_finite(o.get("cosine_similarity")) for o in outputs]},
                {
                    "label": "min cosine (worst sample)",
                    "data": [_finite(o.get("min_cosine_similarity")) for o in outputs],
                },
            ],
        }
    threshold = _finite(budgets[0].get("value"))
    side = ">=" if metric.higher_is_better else "<="
    gate_label = "gate" if threshold is None else f"gate: {metric.value} {side} {threshold:g}"
    missed: dict[str, list[str]] = {}
    for failure in gate.get("failures") or []:
        missed.setdefault(str(failure.get("output")), []).append(str(failure.get("metric")))
    failing = [str(name) in missed for name in labels]
    # a failing output says so under its name (not by colour alone), naming the budgets it
    # misses when the charted metric is not among them
    labels = [_failing_label(name, missed.get(str(name)), metric.value) for name in labels]
    return {
        "labels": labels,
        "datasets": [
            {
                "label": metric.value,
                "data": [_finite(o.get(metric.field)) for o in outputs],
                "failing": failing,
            },
            {
                "label": gate_label,
                "data": [threshold] * len(outputs),
                "type": "line",
                "gateLine": threshold,
                "borderDash": [6, 4],
            },
        ],
        "gate": {"value": threshold, "higherIsBetter": metric.higher_is_better},
    }


def _failing_label(name: Any, missed: list[str] | None, charted: str) -> Any:
    if not missed:
        return name
    if charted in missed:
        return [name, "✗ fails gate"]
    return [name, f"✗ fails gate ({', '.join(dict.fromkeys(missed))})"]


def _metric(value: Any) -> AccuracyMetric | None:
    try:
        return AccuracyMetric(value)
    except ValueError:
        return None


SENSITIVITY_CHART_NODES = 30


def sensitivity_chart(report: SensitivityReport) -> dict[str, Any]:
    """The most sensitive nodes (at most 30), each with its metric when it alone is INT8 and
    when every other node is; the cheap proxy where a node was not evaluated."""
    nodes = report.nodes[:SENSITIVITY_CHART_NODES]
    unit = report.metric.value
    return {
        "indexAxis": "y",
        "labels": [f"{n.rank}. {n.node} ({n.op_type})" for n in nodes],
        "datasets": [
            {"label": f"{unit}, only this node INT8", "data": [n.metric_only_this for n in nodes]},
            {
                "label": f"{unit}, all but this node INT8",
                "data": [n.metric_all_but_this for n in nodes],
            },
            {"label": "proxy SQNR dB", "data": [n.proxy_sqnr_db for n in nodes], "hidden": True},
        ],
    }


@dataclass(frozen=True)
class CalibrationRow:
    name: str
    amax: float
    scale: float
    method: str
    candidates: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationPage:
    """One page of a table's tensors (filtered by ``query``), with its range chart."""

    rows: list[CalibrationRow]
    total: int
    matching: int
    page: int
    pages: int
    query: str
    method: str
    chart: dict[str, Any]


CALIBRATION_PAGE_SIZE = 25


def calibration_page(table: CalibrationTable, query: str, page: int) -> CalibrationPage:
    """Tensors whose name contains ``query`` (case-insensitive), page ``page`` (1-based)."""
    needle = query.strip().lower()
    names = [n for n in table.amax if needle in n.lower()]
    pages = max(1, -(-len(names) // CALIBRATION_PAGE_SIZE))
    page = min(max(1, page), pages)
    start = (page - 1) * CALIBRATION_PAGE_SIZE
    method = table.method.value if table.method else "imported"
    choices = table.range_choices or {}
    rows = []
    for name in names[start : start + CALIBRATION_PAGE_SIZE]:
        choice = choices.get(name)
        rows.append(
            CalibrationRow(
                name=name,
                amax=table.amax[name],
                scale=table.amax[name] / 127.0,
                method=choice.method if choice else method,
                candidates=dict(choice.candidates) if choice else {},
            )
        )
    datasets: list[dict[str, Any]] = [
        {"label": f"amax, chosen ({method})", "data": [r.amax for r in rows]}
    ]
    candidates = sorted({c for r in rows for c in r.candidates})
    for candidate in candidates:  # auto: what each method would have chosen (legend toggles)
        datasets.append(
            {
                "label": f"{candidate} candidate",
                "data": [r.candidates.get(candidate) for r in rows],
                "hidden": candidate != "minmax",
            }
        )
    chart = {"labels": [r.name for r in rows], "datasets": datasets}
    return CalibrationPage(rows, len(table.amax), len(names), page, pages, query, method, chart)


@dataclass(frozen=True)
class CompareRow:
    """One metric across builds, with each build's change against the first."""

    label: str
    values: list[str]
    deltas: list[str]
    better: list[bool | None]


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _delta(
    base: float | None, value: float | None, higher_is_better: bool
) -> tuple[str, bool | None]:
    if base is None or value is None:
        return "", None
    change = value - base
    relative = f" ({change / base:+.1%})" if base else ""
    better = None if change == 0 else (change > 0) == higher_is_better
    return f"{change:+,.4g}{relative}", better


def compare_rows(summaries: list[BuildSummary]) -> list[CompareRow]:
    """Latency, throughput, size and accuracy of each build against the first one."""
    metrics: list[tuple[str, str, int, bool]] = [
        ("latency p50 (ms)", "p50_ms", 3, False),
        ("latency p99 (ms)", "p99_ms", 3, False),
        ("throughput (samples/s)", "throughput_qps", 1, True),
        ("artifact size (bytes)", "size_bytes", 0, False),
        ("worst min cosine", "min_cosine", 5, True),
        ("worst SQNR (dB)", "min_sqnr_db", 2, True),
    ]
    rows = []
    for label, attr, digits, higher in metrics:
        values = [getattr(s, attr) for s in summaries]
        base = values[0] if values else None
        pairs = [_delta(base, v, higher) if i else ("", None) for i, v in enumerate(values)]
        rows.append(
            CompareRow(
                label,
                [_fmt(None if v is None else float(v), digits) for v in values],
                [d for d, _ in pairs],
                [b for _, b in pairs],
            )
        )
    return rows
