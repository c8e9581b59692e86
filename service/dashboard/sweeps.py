"""The dashboard's sweeps: the list with a form that starts one (``POST /v1/sweeps`` in-process),
and a sweep's page: its builds, the measured variants, and the latency/accuracy chart with the
Pareto front, each point a link to its build (and a row of the table right under the chart, whose
links highlight their point when focused: the keyboard's way to the points)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from core.errors import TrtforgeError
from service.api import sweeps as sweeps_api
from service.api.deps import AppState, StateDep
from service.dashboard.forms import (
    call_handler,
    form_choices,
    form_error,
    form_page,
    refused,
    text_fields,
)
from service.dashboard.session import CSRF_FIELD, Viewer, authorize_change
from service.dashboard.views import json_for_script
from service.dashboard.web import page
from service.schemas import SweepCreate, SweepPreset, SweepPublic
from service.store import sweeps as store

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_LIST = 100


def pareto_chart(sweep: SweepPublic) -> dict[str, Any]:
    """The sweep's points (latency p50 against its accuracy metric), the front apart, each
    point carrying the link to its build."""

    def point(p: dict[str, Any]) -> dict[str, Any]:
        label = f"{p['variant']}: {p['x']:.3f} ms, {sweep.chart.y} {p['y']}"
        return {"x": p["x"], "y": p["y"], "href": f"/builds/{p['build_id']}", "label": label}

    points = [p for p in sweep.chart.points if p.get("y") is not None]
    return {
        "xLabel": "latency p50 (ms)",
        "yLabel": sweep.chart.y or "accuracy",
        "datasets": [
            {
                "label": "Pareto front",
                "data": [point(p) for p in points if p.get("pareto")],
                "pointRadius": 7,
                "pointHoverRadius": 11,
                "pointStyle": "rectRot",
            },
            {
                "label": "dominated",
                "data": [point(p) for p in points if not p.get("pareto")],
                "pointRadius": 5,
                "pointHoverRadius": 9,
            },
        ],
    }


def _context(state: AppState, viewer: Viewer) -> dict[str, Any]:
    with state.db.session() as session:
        listing = store.list_sweeps(session, _LIST, 0, project=viewer.principal.listing(None))
        summaries = store.sweep_summary(session, listing.items)
    return {
        "sweeps": summaries,
        "total": listing.total,
        "presets": [p.value for p in SweepPreset],
        **(form_choices(state, viewer) if viewer.can_build else {}),
    }


@router.get("/sweeps", response_class=Response)
async def sweeps_page(request: Request, state: StateDep) -> Response:
    return await page(request, state, "sweeps.html", lambda v: {**_context(state, v), "form": {}})


@router.get("/sweeps/{sweep_id}", response_class=Response)
async def sweep_page(request: Request, state: StateDep, sweep_id: str) -> Response:
    def gather(viewer: Viewer) -> dict[str, Any]:
        with state.db.session() as session:
            row = store.get_sweep(session, sweep_id, viewer.principal.visible)
            sweep = store.sweep_public(session, state.storage, row)
        chart = pareto_chart(sweep)
        has_points = any(d["data"] for d in chart["datasets"])
        return {"sweep": sweep, "chart": json_for_script(chart) if has_points else ""}

    return await page(request, state, "sweep.html", gather)


def sweep_request(form: dict[str, str]) -> SweepCreate:
    """The ``POST /v1/sweeps`` body the form describes."""
    body: dict[str, Any] = {
        "model_id": form.get("model_id", ""),
        "dataset_id": form.get("dataset_id", ""),
    }
    listed = form.get("variants", "").replace("\n", ",").split(",")
    variants = [v.strip() for v in listed if v.strip()]
    if variants:
        body["variants"] = variants
    elif form.get("preset"):
        body["preset"] = form["preset"]
    if form.get("eval_dataset_id"):
        body["eval_dataset_id"] = form["eval_dataset_id"]
    if form.get("name", "").strip():
        body["name"] = form["name"].strip()
    return SweepCreate.model_validate(body)


@router.post("/ui/sweeps")
async def submit_sweep(request: Request, state: StateDep) -> Response:
    form = await text_fields(request)
    try:
        viewer = await authorize_change(request, state, form.get(CSRF_FIELD))
    except TrtforgeError as exc:
        return refused(exc, request, state)
    try:
        answer = await call_handler(
            sweeps_api.create_sweep, sweep_request(form), state, viewer.principal
        )
    except (ValidationError, TrtforgeError) as exc:
        context = await run_in_threadpool(_context, state, viewer)
        return form_page(
            "sweeps.html", viewer, form_error(exc), request_path="/sweeps", form=form, **context
        )
    sweep_id = answer.headers["location"].rsplit("/", 1)[-1]
    return RedirectResponse(f"/sweeps/{quote(sweep_id)}", status_code=303)
