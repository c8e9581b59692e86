"""Prometheus metrics, written in the text exposition format (no client library needed).

Build counts, stage durations and queue depth come from the database, so every API process
reports the same numbers (queue depth also per requested target, live workers per target they
build for, with their labels); upload bytes are counted by this process (a counter that restarts at
zero, as Prometheus counters may).
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import BuildRow, DatasetRow, ModelRow
from service.queue.base import JobQueue
from service.schemas import BuildStatus, Stage, TargetRequest

__all__ = ["Counters", "render_metrics"]


class Counters:
    """Process-local counters (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._upload_bytes: dict[str, int] = defaultdict(int)

    def uploaded(self, kind: str, size_bytes: int) -> None:
        with self._lock:
            self._upload_bytes[kind] += size_bytes

    def upload_bytes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._upload_bytes)


def _help(lines: list[str], name: str, kind: str, text: str) -> None:
    lines.append(f"# HELP {name} {text}")
    lines.append(f"# TYPE {name} {kind}")


def _escape(value: str) -> str:
    """A label value in the exposition format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(values: dict[str, str]) -> str:
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in values.items()) + "}"


def _target_metrics(lines: list[str], queue: JobQueue) -> None:
    """Queue depth per requested target and live workers per target. Empty label values mean
    "not asked" (a build) or "none" (a worker's labels)."""
    _help(
        lines,
        "trtforge_queue_depth_by_target",
        "gauge",
        "Builds waiting for a worker, by the backend and target they asked for.",
    )
    for queued in queue.depth_by_target():
        asked = {"backend": queued.requested_backend, **_target_labels(queued.target)}
        lines.append(f"trtforge_queue_depth_by_target{_labels(asked)} {queued.jobs}")
    _help(
        lines,
        "trtforge_workers_by_target",
        "gauge",
        "Live workers by a target they build for (a worker counts once per target).",
    )
    counts: Counter[tuple[tuple[str, str], ...]] = Counter()
    for worker in queue.workers():
        for target in dict.fromkeys(worker.targets):
            key = {
                "backend": target.backend,
                "backend_version": target.backend_version,
                "compute_capability": target.compute_capability,
                "device": target.device,
                "labels": ",".join(worker.labels),
            }
            counts[tuple(key.items())] += 1
    for served, workers in sorted(counts.items()):
        lines.append(f"trtforge_workers_by_target{_labels(dict(served))} {workers}")


def render_metrics(session: Session, queue: JobQueue, counters: Counters) -> str:
    """The ``/metrics`` page."""
    lines: list[str] = []
    grouped = select(BuildRow.status, func.count()).group_by(BuildRow.status)
    counts = {status: count for status, count in session.execute(grouped)}
    _help(lines, "trtforge_builds", "gauge", "Builds by status.")
    for status in BuildStatus:
        lines.append(f'trtforge_builds{{status="{status.value}"}} {counts.get(status.value, 0)}')

    sums: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = defaultdict(int)
    for timings in session.scalars(select(BuildRow.stage_seconds)):
        for stage, seconds in (timings or {}).items():
            sums[stage] += float(seconds)
            seen[stage] += 1
    _help(lines, "trtforge_stage_duration_seconds", "summary", "Time spent per pipeline stage.")
    for stage in Stage:
        lines.append(
            f'trtforge_stage_duration_seconds_sum{{stage="{stage.value}"}} {sums[stage.value]:.6f}'
        )
        lines.append(
            f'trtforge_stage_duration_seconds_count{{stage="{stage.value}"}} {seen[stage.value]}'
        )

    _help(lines, "trtforge_queue_depth", "gauge", "Builds waiting for a worker.")
    lines.append(f"trtforge_queue_depth {queue.depth()}")
    _help(lines, "trtforge_workers", "gauge", "Workers with a recent heartbeat.")
    lines.append(f"trtforge_workers {queue.live_workers()}")
    _target_metrics(lines, queue)

    _help(
        lines,
        "trtforge_upload_bytes_total",
        "counter",
        "Bytes received in uploads by this process.",
    )
    uploads = counters.upload_bytes()
    for kind in ("model", "dataset", "table"):
        lines.append(f'trtforge_upload_bytes_total{{kind="{kind}"}} {uploads.get(kind, 0)}')

    _help(lines, "trtforge_models", "gauge", "Stored models.")
    lines.append(
        f"trtforge_models {session.scalar(select(func.count()).select_from(ModelRow)) or 0}"
    )
    _help(lines, "trtforge_datasets", "gauge", "Stored datasets.")
    lines.append(
        f"trtforge_datasets {session.scalar(select(func.count()).select_from(DatasetRow)) or 0}"
    )
    return "\n".join(lines) + "\n"


def _target_labels(wanted: TargetRequest | None) -> dict[str, str]:
    """A requested target as label values, one per field (empty: not asked)."""
    values = wanted.model_dump() if wanted else {}
    return {
        field: ",".join(values.get(field) or []) if field == "labels" else values.get(field) or ""
        for field in TargetRequest.model_fields
    }
