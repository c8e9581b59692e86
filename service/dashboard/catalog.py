"""The dashboard's catalog pages: models and datasets (inputs and outputs with shapes and dtypes,
digests, the builds of each), calibration tables (downloadable as a TensorRT cache or JSON),
workers with their targets and the queue, and the comparison of builds side by side. Every page
shows only what the viewer's token may see (its project), as the API's listings do."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from engines.backends.base import BuildTarget
from service.api import workers as workers_api
from service.api.builds import load_build
from service.api.deps import AppState, StateDep
from service.dashboard.queries import model_filenames, model_names
from service.dashboard.session import Viewer
from service.dashboard.views import (
    compare_rows,
    json_for_script,
    stored_report,
    summary_of,
)
from service.dashboard.web import page
from service.errors import NotFoundError
from service.queue.base import JobQueue
from service.queue.targets import serving_target
from service.schemas import BuildStatus, WorkerPublic
from service.store import builds
from service.store import catalog as store

__all__ = ["TargetRow", "WaitingRow", "fleet", "router"]

router = APIRouter(include_in_schema=False)

_LIST = 200
_MAX_COMPARE = 8


def _builds_of(
    state: AppState, viewer: Viewer, model_id: str | None, dataset_id: str | None
) -> list[dict[str, Any]]:
    with state.db.session() as session:
        listing = builds.list_builds(
            session, _LIST, 0, model_id=model_id, project=viewer.principal.listing(None)
        )
        rows = [r for r in listing.items if dataset_id is None or r.dataset_id == dataset_id]
        names = model_names(session, {r.model_id for r in rows})
    out = []
    for row in rows:
        build = builds.build_public(row)
        report = stored_report(state.storage, row.report_sha256)
        name = names.get(row.model_id, "")
        out.append({"b": build, "s": summary_of(build, report), "model_filename": name})
    return out


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


NameQuery = Annotated[str, Query(max_length=200)]


@router.get("/models", response_class=Response)
async def models_page(
    request: Request, state: StateDep, name: NameQuery = "", tag: NameQuery = ""
) -> Response:
    """Models of the viewer's project, filtered by part of a name (or file name) and tags."""

    def gather(viewer: Viewer) -> dict[str, Any]:
        with state.db.session() as session:
            listing = store.list_models(
                session,
                _LIST,
                0,
                viewer.principal.listing(None),
                name=name.strip() or None,
                tags=_tags(tag),
            )
            return {
                "models": [store.model_public(r) for r in listing.items],
                "total": listing.total,
                "filters": {"name": name, "tag": tag},
            }

    return await page(request, state, "models.html", gather)


@router.get("/models/{model_id}", response_class=Response)
async def model_page(request: Request, state: StateDep, model_id: str) -> Response:
    def gather(viewer: Viewer) -> dict[str, Any]:
        with state.db.session() as session:
            row = store.get_model(session, model_id, project=viewer.principal.visible)
            model = store.model_public(row)
            project = viewer.principal.listing(None)
            datasets = store.list_datasets(session, _LIST, 0, model_id, project)
            tables = store.list_tables(session, _LIST, 0, model_id, project)
            datasets_public = [store.dataset_public(d) for d in datasets.items]
            tables_public = [store.table_public(t) for t in tables.items]
        # the builds open their own session: not one nested in this one (two pooled connections)
        return {
            "model": model,
            "datasets": datasets_public,
            "tables": tables_public,
            "rows": _builds_of(state, viewer, model_id, None),
        }

    return await page(request, state, "model.html", gather)


@router.get("/datasets", response_class=Response)
async def datasets_page(
    request: Request, state: StateDep, name: NameQuery = "", tag: NameQuery = ""
) -> Response:
    """Datasets of the viewer's project, filtered by part of a name (or file name) and tags."""

    def gather(viewer: Viewer) -> dict[str, Any]:
        with state.db.session() as session:
            listing = store.list_datasets(
                session,
                _LIST,
                0,
                None,
                viewer.principal.listing(None),
                name=name.strip() or None,
                tags=_tags(tag),
            )
            datasets = [store.dataset_public(r) for r in listing.items]
            names = model_names(session, {d.model_id for d in datasets if d.model_id})
        return {
            "datasets": datasets,
            "total": listing.total,
            "names": names,
            "filters": {"name": name, "tag": tag},
        }

    return await page(request, state, "datasets.html", gather)


@router.get("/datasets/{dataset_id}", response_class=Response)
async def dataset_page(request: Request, state: StateDep, dataset_id: str) -> Response:
    def gather(viewer: Viewer) -> dict[str, Any]:
        with state.db.session() as session:
            row = store.get_dataset(session, dataset_id, project=viewer.principal.visible)
            dataset = store.dataset_public(row)
            names = model_names(session, {dataset.model_id} if dataset.model_id else set())
        return {
            "dataset": dataset,
            "model_name": names.get(dataset.model_id or "", ""),
            "rows": _builds_of(state, viewer, None, dataset_id),
        }

    return await page(request, state, "dataset.html", gather)


@router.get("/tables", response_class=Response)
async def tables_page(request: Request, state: StateDep) -> Response:
    def gather(viewer: Viewer) -> dict[str, Any]:
        with state.db.session() as session:
            listing = store.list_tables(session, _LIST, 0, None, viewer.principal.listing(None))
            tables = [store.table_public(r) for r in listing.items]
            names = model_names(session, {t.model_id for t in tables})
        return {"tables": tables, "total": listing.total, "names": names}

    return await page(request, state, "tables.html", gather)


@dataclass(frozen=True)
class WaitingRow:
    """Builds waiting for one requested backend and target, and the live workers that could
    take them (none: they wait until such a worker starts)."""

    requested_backend: str
    target: str
    jobs: int
    able_workers: int


@dataclass(frozen=True)
class TargetRow:
    """A target live workers build for, and how many do (``trtforge_workers_by_target``)."""

    target: BuildTarget
    labels: str
    workers: int


def fleet(queue: JobQueue, workers: list[WorkerPublic]) -> dict[str, Any]:
    """The queue by requested target with the live workers able to take each, and live workers
    per target they build for: what ``/metrics`` exports, for the workers page."""
    waiting = [
        WaitingRow(
            q.requested_backend,
            str(q.target) if q.target else "any worker",
            q.jobs,
            sum(
                serving_target(q.requested_backend, q.target, w.targets, w.labels) is not None
                for w in workers
                if w.problem is None  # live, but it reported it takes no builds
            ),
        )
        for q in queue.depth_by_target()
    ]
    counts: Counter[tuple[BuildTarget, str]] = Counter()
    for worker in workers:
        for target in dict.fromkeys(worker.targets):
            counts[(target, ", ".join(worker.labels))] += 1
    by_target = [TargetRow(t, labels, n) for (t, labels), n in counts.items()]
    by_target.sort(
        key=lambda r: (r.target.backend, r.target.backend_version, r.target.device, r.labels)
    )
    return {"depth": queue.depth(), "waiting": waiting, "by_target": by_target}


@router.get("/workers", response_class=Response)
async def workers_page(request: Request, state: StateDep) -> Response:
    """Live workers (their running builds of the viewer's project only), live workers per
    target, and the queue (service-wide: every project's builds wait in it) by requested
    target."""

    def gather(viewer: Viewer) -> dict[str, Any]:
        # as GET /v1/workers: running builds of other projects are not shown
        workers = workers_api.list_workers(state, viewer.principal, False)
        return {"workers": workers, **fleet(state.queue, workers)}

    return await page(request, state, "workers.html", gather)


@router.get("/compare", response_class=Response)
async def compare_page(
    request: Request,
    state: StateDep,
    ids: Annotated[list[str], Query(max_length=_MAX_COMPARE)] = [],  # noqa: B006 - FastAPI's way
) -> Response:
    """Builds side by side (``?ids=A&ids=B``, or one ``ids=A,B``): latency, throughput, size and
    accuracy, each against the first build."""
    wanted = [i for text in ids for i in text.split(",") if i.strip()][:_MAX_COMPARE]

    def gather(viewer: Viewer) -> dict[str, Any]:
        rows = []
        with state.db.session() as session:
            for build_id in wanted:
                row = load_build(session, build_id.strip())
                if viewer.principal.visible not in (None, row.project):
                    raise NotFoundError(f"No build with id {build_id!r}.", field="ids")
                rows.append((builds.build_public(row), row.report_sha256))
            filenames = model_filenames(session, {b.model_id for b, _ in rows})
        found = []  # reports are read with no database connection held
        for build, report_sha256 in rows:
            report = stored_report(state.storage, report_sha256)
            found.append((build, summary_of(build, report), filenames.get(build.model_id, "")))
        summaries = [s for _, s, _ in found]
        chart = {
            "labels": [f"{b.id[:8]} {b.spec.precision.value}" for b, _, _ in found],
            "datasets": [
                {"label": "latency p50 (ms)", "data": [s.p50_ms for s in summaries]},
                {"label": "latency p99 (ms)", "data": [s.p99_ms for s in summaries]},
            ],
        }
        return {
            "builds": found,
            "rows": compare_rows(summaries),
            "chart": json_for_script(chart) if found else "",
            "succeeded": BuildStatus.SUCCEEDED,
        }

    return await page(request, state, "compare.html", gather)
