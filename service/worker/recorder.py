"""Recording a running build in the database: status, stage, progress, stage timings, log lines.

The pipeline calls :class:`BuildRecorder` from the build's child process; readers (the API, the
events stream) see its writes as they happen. Progress writes are throttled so a callback per
batch does not become a write per batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.db import Database
from service.db.models import BuildLogRow, BuildRow, utcnow
from service.errors import BuildCancelledError, scrub_paths
from service.schemas import BuildStatus, Stage, stage_status

__all__ = [
    "STAGE_WEIGHTS",
    "BuildRecorder",
    "RecorderBase",
    "StageProgress",
    "add_log",
    "reset_for_retry",
]

log = logging.getLogger(__name__)

STAGE_WEIGHTS: dict[Stage, float] = {
    Stage.CALIBRATE: 0.4,
    Stage.BUILD: 0.3,
    Stage.BENCHMARK: 0.15,
    Stage.EVALUATE: 0.15,
}
"""Share of the overall progress bar each stage takes."""

_MAX_MESSAGE_CHARS = 20_000


def add_log(
    session: Session,
    build_id: str,
    message: str,
    *,
    level: str = "info",
    stage: Stage | None = None,
) -> None:
    """Add a log line to a build (in the caller's transaction)."""
    session.add(
        BuildLogRow(
            build_id=build_id,
            level=level,
            stage=stage.value if stage is not None else None,
            message=message[:_MAX_MESSAGE_CHARS],
        )
    )


def reset_for_retry(build: BuildRow) -> None:
    """Put a build back to ``queued`` with nothing of the interrupted run left on it."""
    build.status = BuildStatus.QUEUED.value
    build.stage = None
    build.progress = 0.0
    build.table_from_cache = None
    build.stage_seconds = {}
    build.error_code = build.error_message = build.error_hint = None
    build.started_at = build.finished_at = None
    build.cancel_requested = False
    build.worker_id = None  # no worker holds it now: a late write of the old one is refused


def _stage_start(stage: Stage) -> float:
    return sum(STAGE_WEIGHTS[s] for s in Stage if list(Stage).index(s) < list(Stage).index(stage))


class StageProgress:
    """Progress callbacks for one stage, throttled."""

    def __init__(self, recorder: RecorderBase, stage: Stage) -> None:
        self._recorder = recorder
        self._stage = stage
        self._last_write = 0.0
        self._last_message = ""

    def fraction(self, done: float) -> None:
        """Progress within the stage, 0 to 1."""
        now = time.monotonic()
        if now - self._last_write < self._recorder.min_interval_s and done < 1.0:
            return
        self._last_write = now
        overall = _stage_start(self._stage) + STAGE_WEIGHTS[self._stage] * min(max(done, 0.0), 1.0)
        self._recorder.set_progress(overall)

    def samples(self, done: int, total: int) -> None:
        """A ``progress(done, total)`` callback (calibration)."""
        self.fraction(done / total if total else 0.0)

    def message(self, message: str, done: float) -> None:
        """A ``progress(message, fraction)`` callback (builds, benchmarks); logs new messages."""
        if message and message != self._last_message:
            self._last_message = message
            self._recorder.log(message, stage=self._stage)
        self.fraction(done)


class RecorderBase:
    """What a build records, and in which order; where it goes is the subclass's:
    :class:`BuildRecorder` writes the database, :class:`service.worker.remote_build.RemoteRecorder`
    sends it to the API (a worker on another machine)."""

    def __init__(
        self, build_id: str, *, min_interval_s: float = 0.5, data_dir: Path | None = None
    ) -> None:
        self.build_id = build_id
        self.data_dir = data_dir
        """Paths under it (and the machine's temp, home, working and Python folders) are cut to
        their last part in what the build records: users read it through the API."""
        self.min_interval_s = min_interval_s
        self.stage_seconds: dict[str, float] = {}

    def _update(self, line: tuple[str, str] | None = None, **values: Any) -> object:
        """Set the build's columns ``values``, plus an optional (level, message) log line."""
        raise NotImplementedError

    def log(self, message: str, *, level: str = "info", stage: Stage | None = None) -> None:
        raise NotImplementedError

    def check_cancel(self) -> None:
        """Raise :class:`BuildCancelledError` when a cancel was requested (stage boundaries)."""
        raise NotImplementedError

    def _echo(self, level: str, message: str) -> None:
        getattr(log, level if level in ("debug", "info", "warning", "error") else "info")(
            "build %s: %s", self.build_id[:8], message
        )

    def set_progress(self, overall: float) -> None:
        self._update(progress=round(min(max(overall, 0.0), 1.0), 4))

    def start(self, attempt: int | None) -> None:
        self._update(started_at=utcnow(), stage_seconds={})
        suffix = f" (attempt {attempt})" if attempt and attempt > 1 else ""
        self.log(f"Build started{suffix}.")

    @contextlib.contextmanager
    def stage(self, stage: Stage) -> Iterator[StageProgress]:
        """Run one stage: cancel check, status, timing, progress at both ends."""
        self.check_cancel()
        self._update(
            status=stage_status(stage).value,
            stage=stage.value,
            progress=round(_stage_start(stage), 4),
        )
        self.log(f"{stage.value}: started", stage=stage)
        started = time.perf_counter()
        yield StageProgress(self, stage)
        seconds = time.perf_counter() - started
        # a stage entered again (a budget search then the build; evaluation then sensitivity)
        # counts all its time
        total = self.stage_seconds.get(stage.value, 0.0) + seconds
        self.stage_seconds[stage.value] = round(total, 3)
        self._update(
            stage_seconds=dict(self.stage_seconds),
            progress=round(_stage_start(stage) + STAGE_WEIGHTS[stage], 4),
        )
        self.log(f"{stage.value}: done in {seconds:.2f} s", stage=stage)

    def skip(self, stage: Stage, reason: str) -> None:
        self.log(f"{stage.value}: skipped ({reason})", stage=stage)

    def set_table(self, table_id: str | None, from_cache: bool) -> None:
        self._update(table_id=table_id, table_from_cache=from_cache)

    def succeed(self, **artifact: Any) -> None:
        self._update(
            ("info", "Build succeeded."),
            status=BuildStatus.SUCCEEDED.value,
            stage=None,
            progress=1.0,
            finished_at=utcnow(),
            **artifact,
        )

    def fail(
        self, code: str, message: str, hint: str = "", details: str = "", **artifact: Any
    ) -> None:
        """End the build as failed. ``artifact`` links what it did publish (a build that failed
        its accuracy gate keeps its artifact and report for inspection)."""
        if details:
            self.log(details, level="error")
        message, hint = scrub_paths(message, self.data_dir), scrub_paths(hint, self.data_dir)
        self._update(
            ("error", f"Build failed: {message}"),
            status=BuildStatus.FAILED.value,
            stage=None,
            finished_at=utcnow(),
            error_code=code,
            error_message=message,
            error_hint=hint,
            **artifact,
        )

    def cancelled(self) -> None:
        self._update(
            ("warning", "Build cancelled."),
            status=BuildStatus.CANCELLED.value,
            stage=None,
            finished_at=utcnow(),
        )


class BuildRecorder(RecorderBase):
    """Writes one build's state. Every write is its own short transaction."""

    def __init__(
        self,
        db: Database,
        build_id: str,
        *,
        min_interval_s: float = 0.5,
        data_dir: Path | None = None,
    ) -> None:
        super().__init__(build_id, min_interval_s=min_interval_s, data_dir=data_dir)
        self.db = db

    def _update(self, line: tuple[str, str] | None = None, **values: Any) -> BuildRow:
        """Set columns, plus an optional (level, message) log line in the same transaction."""
        with self.db.session() as session:
            build = session.get_one(BuildRow, self.build_id)
            for key, value in values.items():
                setattr(build, key, value)
            if line is not None:
                level, message = line
                self._echo(level, message)
                add_log(session, self.build_id, message, level=level)
            session.commit()
            return build

    def log(self, message: str, *, level: str = "info", stage: Stage | None = None) -> None:
        self._echo(level, message)
        with self.db.session() as session:
            add_log(
                session,
                self.build_id,
                scrub_paths(message, self.data_dir),
                level=level,
                stage=stage,
            )
            session.commit()

    def check_cancel(self) -> None:
        """Raise :class:`BuildCancelledError` when a cancel was requested (stage boundaries)."""
        with self.db.session() as session:
            build = session.get_one(BuildRow, self.build_id)
            if build.cancel_requested:
                raise BuildCancelledError("The build was cancelled.")
