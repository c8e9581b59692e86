"""Per-node sensitivity as a build-scoped resource (``/v1/builds/{id}/sensitivity``).

Sensitivity is computed in a build's pipeline, on a worker, like everything a build measures: a
build whose request has ``sensitivity`` ranks its nodes after its accuracy check and keeps the
ranking in its report. ``POST /v1/builds/{id}/sensitivity`` on a build that did not ask submits
the same request with ``sensitivity`` set, through the queue, as a build of its own (deduplicated
by its cache key; its calibration table comes from the table cache), and the first build records
which build computes it (``sensitivity_build_id``). So it inherits the queue's retries, cancel,
recovery and target matching, and runs where the build's backend runs.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from engines.sensitivity_report import SensitivityReport
from service.db.models import BuildRow
from service.errors import NotFoundError
from service.queue.base import JobQueue
from service.schemas import (
    BuildCreate,
    BuildStatus,
    ErrorInfo,
    SensitivityOptions,
    SensitivityPublic,
)
from service.store.builds import get_build, submit_build
from service.store.storage import Storage

__all__ = ["report_part", "request_sensitivity", "sensitivity_public"]


def request_sensitivity(
    session: Session,
    storage: Storage,
    queue: JobQueue,
    build_id: str,
    options: SensitivityOptions,
    project: str | None,
) -> tuple[BuildRow, BuildRow, bool]:
    """(the build, the build that computes its sensitivity, whether that one was queued now)."""
    build = get_build(session, build_id, project)
    request = BuildCreate.model_validate(build.request)
    if request.sensitivity == options:  # its own request asked for exactly this
        if build.sensitivity_build_id is not None:
            build.sensitivity_build_id = None
            session.commit()
        return build, build, False
    run, created = submit_build(
        session, storage, queue, request.model_copy(update={"sensitivity": options}), project
    )
    build = get_build(session, build_id, project)
    if build.sensitivity_build_id != run.id:
        build.sensitivity_build_id = run.id
        session.commit()
    return build, run, created


def sensitivity_public(session: Session, storage: Storage, build: BuildRow) -> SensitivityPublic:
    """The sensitivity of ``build``: computed by itself or by the build its POST submitted."""
    request = BuildCreate.model_validate(build.request)
    run = build  # the last one asked for: a POST's build, else the build's own request's
    asked = build.sensitivity_build_id
    found = session.get(BuildRow, asked) if asked else None
    if found is not None:
        run = found
    elif request.sensitivity is None:
        gone = " (the build that computed it was deleted)" if build.sensitivity_build_id else ""
        raise NotFoundError(
            f"Build {build.id[:12]} has no sensitivity ranking{gone}.",
            hint=f"Compute it with POST /v1/builds/{build.id}/sensitivity.",
            field="build_id",
        )
    options = BuildCreate.model_validate(run.request).sensitivity or SensitivityOptions()
    report = None
    if run.report_sha256:
        report = report_part(storage, run.report_sha256, "sensitivity", SensitivityReport)
    error = None
    if run.error_code:
        error = ErrorInfo(
            code=run.error_code, message=run.error_message or "", hint=run.error_hint or ""
        )
    base = f"/v1/builds/{build.id}"
    links = {"self": f"{base}/sensitivity", "build": base, "run": f"/v1/builds/{run.id}"}
    if run.report_sha256:
        links["report"] = f"/v1/builds/{run.id}/report"
    return SensitivityPublic(
        build_id=build.id,
        run_build_id=run.id,
        status=BuildStatus(run.status),
        options=options,
        report=report,
        error=error,
        links=links,
    )


def report_part(storage: Storage, sha256: str, key: str, model: Any) -> Any:
    """One top-level part of a stored build report, validated as ``model`` (None when absent
    or unreadable: a report from an older server)."""
    value = _report(storage, sha256).get(key)
    if value is None:
        return None
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


@lru_cache(maxsize=32)
def _report_cached(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_bytes())
    return data if isinstance(data, dict) else {}


def _report(storage: Storage, sha256: str) -> dict[str, Any]:
    """A build report's JSON (reports are immutable blobs: cached by their path = sha256)."""
    path = storage.blob_path(sha256)
    try:
        return _report_cached(str(path))
    except (OSError, ValueError):
        return {}
