"""The dashboard's forms: the new-build page, uploads of models and datasets, submitting and
cancelling builds. Every form post needs scope ``build`` and the CSRF token
(:mod:`service.dashboard.session`); the work itself is the REST endpoint's, called in-process,
so the dashboard accepts and refuses exactly what ``/v1`` does.

Uploads carry the CSRF token in the ``X-CSRF-Token`` header (the page's script, which shows a
progress bar) or in the query string (a plain form post): either way it is checked before the
body is read.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from calibrators.spec import CalibrationMethod
from core.errors import TrtforgeError
from engines.accuracy_report import AccuracyMetric
from engines.errors import SpecError
from engines.names import BackendName
from engines.spec import Precision
from service.api import builds as builds_api
from service.api import datasets as datasets_api
from service.api import models as models_api
from service.api import sensitivity as sensitivity_api
from service.api.deps import AppState, StateDep
from service.api.errors import response_for_error, status_for
from service.dashboard.render import render
from service.dashboard.session import CSRF_FIELD, Viewer, authorize_change, remember_csrf
from service.dashboard.web import error_page, page, sign_in_page
from service.errors import AuthenticationError, PermissionDeniedError
from service.schemas import BuildCreate, Scope, TargetRequest
from service.store import catalog as store

__all__ = [
    "build_request",
    "call_handler",
    "form_choices",
    "form_error",
    "form_page",
    "refused",
    "router",
    "text_fields",
]

router = APIRouter(include_in_schema=False)

_CHOICES = 200
_RETURN_PATHS = ("/builds/new", "/models", "/datasets")
# the upload routes' query: the form's CSRF token, and the page to return to (one of _RETURN_PATHS)
_CsrfQuery = Annotated[str | None, Query(max_length=128)]
_BackQuery = Annotated[str, Query(max_length=64)]


def _lines(text: str) -> list[str]:
    return [t.strip() for t in text.replace(",", "\n").splitlines() if t.strip()]


def form_choices(state: AppState, viewer: Viewer) -> dict[str, Any]:
    """The models and datasets a form offers (the viewer's project), precisions, methods."""
    project = viewer.principal.listing(None)
    with state.db.session() as session:
        models = store.list_models(session, _CHOICES, 0, project).items
        datasets = store.list_datasets(session, _CHOICES, 0, None, project).items
        models_public = [store.model_public(r) for r in models]
        datasets_public = [store.dataset_public(r) for r in datasets]
    return {
        "models": models_public,
        "datasets": datasets_public,
        "precisions": [p.value for p in Precision],
        "methods": [m.value for m in CalibrationMethod],
        "metrics": [m.value for m in AccuracyMetric],
        "backends": [b.value for b in BackendName],
    }


@router.get("/builds/new", response_class=Response)
async def new_build(
    request: Request,
    state: StateDep,
    model_id: Annotated[str, Query(max_length=128)] = "",
    dataset_id: Annotated[str, Query(max_length=128)] = "",
) -> Response:
    """The new-build form (scope ``build``: read-only viewers get the sign-in page)."""

    def gather(viewer: Viewer) -> dict[str, Any]:
        chosen = {"model_id": model_id, "dataset_id": dataset_id}
        return {**form_choices(state, viewer), "form": chosen}

    return await page(request, state, "new.html", gather, needed=Scope.BUILD)


def build_request(form: dict[str, str]) -> BuildCreate:
    """The ``POST /v1/builds`` body a new-build form describes (``ValidationError`` names the
    field that is wrong)."""
    method = form.get("method") or "auto"
    calibration: dict[str, Any] = {"method": method}
    if method == "percentile" and form.get("percentile"):
        calibration["percentile"] = form["percentile"]
    spec: dict[str, Any] = {
        "precision": form.get("precision") or "int8-fp16",
        "calibration": calibration,
        "keep": {
            "int8": _lines(form.get("keep_int8", "")),
            "fp16": _lines(form.get("keep_fp16", "")),
        },
    }
    if form.get("backend"):
        spec["backend"] = form["backend"]
    if form.get("gate", "").strip():
        spec["gate"] = _lines(form["gate"])
    body: dict[str, Any] = {
        "model_id": form.get("model_id", ""),
        "dataset_id": form.get("dataset_id", ""),
        "spec": spec,
    }
    if form.get("eval_dataset_id", "").strip():
        body["eval_dataset_id"] = form["eval_dataset_id"].strip()
    if form.get("labels", "").strip():
        body["labels"] = _lines(form["labels"])
    if form.get("budget", "").strip():
        body["accuracy_budget"] = form["budget"].strip()
    if form.get("eval_fraction", "").strip():
        body["accuracy"] = {"eval_fraction": form["eval_fraction"]}
    target: dict[str, Any] = {
        field: _lines(form.get(f"target_{field}", ""))
        if field == "labels"
        else form.get(f"target_{field}", "").strip() or None
        for field in TargetRequest.model_fields
    }
    if any(target.values()):
        body["target"] = target
    return BuildCreate.model_validate(body)


def form_error(exc: ValidationError | TrtforgeError) -> TrtforgeError:
    """A refused form's error (a field that does not validate: a :class:`SpecError` naming
    it)."""
    if isinstance(exc, TrtforgeError):
        return exc
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "form"
    return SpecError(
        f"{where}: {first['msg']}", hint="Correct the field and submit again.", field=where
    )


def form_page(template: str, viewer: Viewer, error: TrtforgeError, **context: Any) -> Response:
    """The form again, as it was filled in, with what was wrong (the API's status)."""
    html = render(
        template,
        viewer=viewer,
        request_path=context.pop("request_path"),
        error={"message": error.message, "hint": error.hint, "field": error.field or ""},
        **context,
    )
    return HTMLResponse(html, status_code=status_for(error))


async def text_fields(request: Request) -> dict[str, str]:
    """The posted form's text fields (uploaded files left out)."""
    return {k: v for k, v in (await request.form()).items() if isinstance(v, str)}


@router.post("/ui/builds")
async def submit_build(request: Request, state: StateDep) -> Response:
    """Submit the new-build form; lands on the build's page."""
    form = await text_fields(request)
    try:
        viewer = await authorize_change(request, state, form.get(CSRF_FIELD))
    except TrtforgeError as exc:
        return refused(exc, request, state)
    try:
        body = build_request(form)
        answer = await call_handler(builds_api.create_build, body, state, viewer.principal)
    except (ValidationError, TrtforgeError) as exc:
        choices = await _choices(state, viewer)
        return form_page(
            "new.html", viewer, form_error(exc), request_path="/builds/new", form=form, **choices
        )
    build_id = answer.headers["location"].rsplit("/", 1)[-1]
    return RedirectResponse(f"/builds/{quote(build_id)}", status_code=303)


async def _choices(state: AppState, viewer: Viewer) -> dict[str, Any]:
    return await run_in_threadpool(form_choices, state, viewer)


async def call_handler(handler: Any, *args: Any) -> Response:
    """A REST handler called in-process (plain ``def`` ones in the thread pool)."""
    if inspect.iscoroutinefunction(handler):
        result: Response = await handler(*args)
    else:
        result = await run_in_threadpool(handler, *args)
    return result


def refused(exc: TrtforgeError, request: Request, state: AppState) -> Response:
    """A refused form post's answer: the sign-in page when the viewer lacks access, else the
    error page (a missing CSRF token among them)."""
    if isinstance(exc, AuthenticationError | PermissionDeniedError) and exc.field != CSRF_FIELD:
        return sign_in_page(exc, request, state)
    return error_page(exc, None)


@router.post("/ui/builds/{build_id}/cancel")
async def cancel_build(request: Request, state: StateDep, build_id: str) -> Response:
    sent = (await text_fields(request)).get(CSRF_FIELD)
    try:
        viewer = await authorize_change(request, state, sent)
        await call_handler(builds_api.cancel_build, build_id, state, viewer.principal)
    except TrtforgeError as exc:
        return refused(exc, request, state)
    if request.headers.get("accept", "").startswith("application/json"):
        return JSONResponse({"id": build_id, "cancel_requested": True})
    return RedirectResponse(f"/builds/{quote(build_id)}", status_code=303)


@router.post("/ui/builds/{build_id}/sensitivity")
async def request_sensitivity(request: Request, state: StateDep, build_id: str) -> Response:
    """Rank the build's nodes by INT8 sensitivity (``POST /v1/builds/{id}/sensitivity``)."""
    sent = (await text_fields(request)).get(CSRF_FIELD)
    try:
        viewer = await authorize_change(request, state, sent)
        await call_handler(
            sensitivity_api.request_sensitivity, build_id, state, viewer.principal, None
        )
    except TrtforgeError as exc:
        return refused(exc, request, state)
    return RedirectResponse(f"/builds/{quote(build_id)}#sensitivity", status_code=303)


def _return_to(path: str, key: str, value: str) -> str:
    base = path if path in _RETURN_PATHS else "/builds/new"
    return f"{base}?{key}={quote(value)}"


async def _upload(
    request: Request, state: AppState, handler: Any, key: str, csrf: str | None, back: str
) -> Response:
    try:
        viewer = await authorize_change(request, state, csrf)
        answer = Response()
        stored = await handler(request, answer, state, viewer.principal)
    except TrtforgeError as exc:
        if request.headers.get("accept", "").startswith("application/json"):
            return response_for_error(exc, state.settings.data_dir)
        return refused(exc, request, state)
    if request.headers.get("accept", "").startswith("application/json"):
        return JSONResponse(stored.model_dump(mode="json"), status_code=answer.status_code)
    response = RedirectResponse(_return_to(back, key, stored.id), status_code=303)
    remember_csrf(response, request, state, viewer)
    return response


@router.post("/ui/models")
async def upload_model(
    request: Request,
    state: StateDep,
    csrf_token: _CsrfQuery = None,
    back: _BackQuery = "/builds/new",
) -> Response:
    """Upload a model (multipart ``file``, as ``POST /v1/models``)."""
    return await _upload(request, state, models_api.upload_model, "model_id", csrf_token, back)


@router.post("/ui/datasets")
async def upload_dataset(
    request: Request,
    state: StateDep,
    csrf_token: _CsrfQuery = None,
    back: _BackQuery = "/builds/new",
) -> Response:
    """Upload a dataset (multipart ``file`` and ``model_id``, as ``POST /v1/datasets``)."""
    return await _upload(
        request, state, datasets_api.upload_dataset, "dataset_id", csrf_token, back
    )
