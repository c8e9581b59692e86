"""``/v1/sweeps``: build a model as several variants through the queue and compare them (its
builds, the measured points, the Pareto front, chart data): :mod:`service.store.sweeps`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.api.caching import json_response
from service.api.deps import BuildAccess, Paging, ReadAccess, StateDep
from service.api.projects import ProjectQuery
from service.schemas import BuildCreate, SweepCreate, SweepPage, SweepPublic
from service.store import sweeps
from service.store.bounds import check_request_bounds

__all__ = ["router"]

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])


@router.post("", operation_id="create_sweep", status_code=202, response_model=SweepPublic)
def create_sweep(body: SweepCreate, state: StateDep, caller: BuildAccess) -> Response:
    """One build per variant (``variants``, or a ``preset``), each queued like ``POST
    /v1/builds`` (an identical build is reused); the sweep aggregates them."""
    probe = BuildCreate(
        model_id=body.model_id,
        dataset_id=body.dataset_id,
        calibration=body.calibration,
        benchmark=body.benchmark,
        accuracy=body.accuracy,
    )
    check_request_bounds(probe, state.settings)  # the server's bounds, before any build
    with state.db.session() as session:
        row = sweeps.create_sweep(session, state.storage, state.queue, body, caller.visible)
        public = sweeps.sweep_public(session, state.storage, row)
    return json_response(public, status_code=202, headers={"Location": public.links["self"]})


@router.get("", operation_id="list_sweeps", response_model=SweepPage)
def list_sweeps(
    state: StateDep,
    paging: Paging,
    caller: ReadAccess,
    model_id: Annotated[str | None, Query(max_length=128)] = None,
    project: ProjectQuery = None,
) -> Response:
    with state.db.session() as session:
        page = sweeps.list_sweeps(
            session,
            paging.limit,
            paging.offset,
            model_id=model_id,
            project=caller.listing(project),
        )
        items = sweeps.sweep_summary(session, page.items)
    return json_response(
        SweepPage(items=items, total=page.total, limit=paging.limit, offset=paging.offset)
    )


@router.get("/{sweep_id}", operation_id="get_sweep", response_model=SweepPublic)
def get_sweep(sweep_id: str, state: StateDep, caller: ReadAccess) -> Response:
    """The sweep's builds and statuses, the measured variants, the Pareto front and chart
    data (points as they are measured: poll until ``status`` is terminal)."""
    with state.db.session() as session:
        row = sweeps.get_sweep(session, sweep_id, caller.visible)
        public = sweeps.sweep_public(session, state.storage, row)
    return json_response(public, headers={"Cache-Control": "no-cache"})


@router.get(
    "/{sweep_id}/chart.svg",
    operation_id="get_sweep_chart",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}, "description": "The sweep's chart."}},
)
def get_sweep_chart(sweep_id: str, state: StateDep, caller: ReadAccess) -> Response:
    """Latency against accuracy (the Pareto front highlighted) and p50/p90/p99 latency per
    measured variant, as ``trtforge sweep`` draws ``sweep.svg``."""
    with state.db.session() as session:
        row = sweeps.get_sweep(session, sweep_id, caller.visible)
        public = sweeps.sweep_public(session, state.storage, row)
        svg = sweeps.chart_svg(session, public)
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-cache"})


@router.delete("/{sweep_id}", operation_id="delete_sweep", status_code=204)
def delete_sweep(sweep_id: str, state: StateDep, caller: BuildAccess) -> Response:
    """Forget the sweep; its builds stay (``DELETE /v1/builds/{id}`` deletes one)."""
    with state.db.session() as session:
        sweeps.delete_sweep(session, sweep_id, caller.visible)
    return Response(status_code=204)
