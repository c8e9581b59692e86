"""Prometheus metrics, written in the text exposition format (no client library needed).

Build counts, stage durations and queue depth come from the database, so every API process
reports the same numbers; upload bytes are counted by this process (a counter that restarts at
zero, as Prometheus counters may).
"""

from __future__ import annotations

import threading
from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import BuildRow, DatasetRow, ModelRow
from service.queue.base import JobQueue
from service.schemas import BuildStatus, Stage

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
