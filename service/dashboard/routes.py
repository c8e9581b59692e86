"""Dashboard routes: the builds list (``/``), a build's page (``/builds/{id}``) and the fragments
its scripts swap in while the build runs, sign-in (``/login``: a token becomes a signed,
expiring session cookie, never the token itself) and sign-out, and the vendored static files.
Forms (``forms.py``) and the catalog pages (``catalog.py``) are included here."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core.errors import TrtforgeError
from engines.names import BackendName
from engines.spec import Precision
from service.api.auth import SESSION_COOKIE, authenticate, create_session, session_secret
from service.api.builds import load_build
from service.api.deps import AppState, StateDep
from service.dashboard import catalog, forms, sweeps
from service.dashboard.queries import BuildFilter, filtered_builds, model_names
from service.dashboard.render import STATIC
from service.dashboard.session import CSRF_FIELD, Viewer, check_csrf, secure_cookies, viewer_of
from service.dashboard.views import (
    accuracy_chart,
    calibration_page,
    json_for_script,
    latency_chart,
    sensitivity_chart,
    stages_of,
    stored_report,
    summary_of,
)
from service.dashboard.web import error_page, page, safe_next, sign_in_page
from service.db.models import BuildRow
from service.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from service.schemas import BuildStatus, Scope, SensitivityPublic
from service.store import builds
from service.store import catalog as store
from service.store import sensitivity as sensitivity_store

__all__ = ["router"]

router = APIRouter(include_in_schema=False)
router.include_router(forms.router)  # first: /builds/new before /builds/{build_id}
router.include_router(catalog.router)
router.include_router(sweeps.router)

_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".md": "text/plain"}
_PAGE_SIZE = 50
_MAX_PAGE = 1_000_000
_LOG_LINES = 2000
# the build page's and its calibration section's search and page (the section swaps itself)
_TableSearch = Annotated[str, Query(max_length=200)]
_TablePage = Annotated[int, Query(ge=1, le=_MAX_PAGE)]


def _row_context(state: AppState, row: Any, model_filename: str) -> dict[str, Any]:
    build = builds.build_public(row)
    report = stored_report(state.storage, row.report_sha256)
    return {"b": build, "s": summary_of(build, report), "model_filename": model_filename}


@router.get("/", response_class=Response)
async def index(
    request: Request,
    state: StateDep,
    status: Annotated[BuildStatus | None, Query()] = None,
    model: Annotated[str, Query(max_length=200)] = "",
    precision: Annotated[Precision | None, Query()] = None,
    target: Annotated[str, Query(max_length=32)] = "",
    page_number: Annotated[int, Query(alias="page", ge=1, le=_MAX_PAGE)] = 1,
) -> Response:
    def gather(viewer: Viewer) -> dict[str, Any]:
        where = BuildFilter(
            model.strip(),
            status,
            precision.value if precision else "",
            target,
            viewer.principal.listing(None),
        )
        with state.db.session() as session:
            found, total = filtered_builds(
                session, where, _PAGE_SIZE, (page_number - 1) * _PAGE_SIZE
            )
            rows = [_row_context(state, r, name) for r, name in found]
        return {
            "rows": rows,
            "total": total,
            "page": page_number,
            "pages": max(1, -(-total // _PAGE_SIZE)),
            "where": where,
            "statuses": [s.value for s in BuildStatus],
            "precisions": [p.value for p in Precision],
            "targets": [b.value for b in BackendName],
        }

    return await page(request, state, "index.html", gather)


@router.get("/fragments/builds", response_class=Response)
async def build_rows(
    request: Request,
    state: StateDep,
    ids: Annotated[list[str], Query(max_length=_PAGE_SIZE)] = [],  # noqa: B006 - FastAPI's way
) -> Response:
    """Rows of the builds list (its script swaps them in while their builds run); ids the
    viewer may not see are left out."""

    def gather(viewer: Viewer) -> dict[str, Any]:
        with state.db.session() as session:
            found = []
            for build_id in ids:
                try:
                    found.append(visible_build(session, build_id, viewer))
                except NotFoundError:
                    continue
            names = model_names(session, {row.model_id for row in found})
            rows = [_row_context(state, row, names.get(row.model_id, "")) for row in found]
        return {"rows": rows, "selectable": True}

    return await page(request, state, "_build_rows.html", gather)


def _table_page(
    session: Session, state: AppState, table_id: str | None, query: str, number: int
) -> Any:
    if not table_id:
        return None
    try:
        row = store.get_table(session, table_id)
    except NotFoundError:
        return None
    return calibration_page(store.load_table(state.storage, row), query, number)


def _ranges_chart(table: Any) -> dict[str, str]:
    """The calibration section's chart data (none for a build without a table or rows)."""
    return {"ranges": json_for_script(table.chart)} if table is not None and table.rows else {}


def _sensitivity(session: Session, state: AppState, row: BuildRow) -> SensitivityPublic | None:
    """The build's node sensitivity ranking, if one was asked for (None otherwise)."""
    try:
        return sensitivity_store.sensitivity_public(session, state.storage, row)
    except NotFoundError:
        return None


def visible_build(session: Session, build_id: str, viewer: Viewer) -> BuildRow:
    """The build with its job, when the viewer's project holds it (else 404, as the API)."""
    row = load_build(session, build_id)
    if viewer.principal.visible not in (None, row.project):
        builds.get_build(session, build_id, viewer.principal.visible)  # raises NotFoundError
    return row


def _build_context(
    state: AppState, viewer: Viewer, build_id: str, query: str = "", table_page: int = 1
) -> dict[str, Any]:
    with state.db.session() as session:
        row = visible_build(session, build_id, viewer)
        build = builds.build_public(row)
        model = store.model_public(store.get_model(session, row.model_id))
        dataset = store.dataset_public(store.get_dataset(session, row.dataset_id))
        logs = builds.log_lines(session, build_id, 0, _LOG_LINES)
        table = _table_page(session, state, row.table_id, query, table_page)
        request_json = row.request
        ranking = _sensitivity(session, state, row)
    report = stored_report(state.storage, row.report_sha256)
    charts: dict[str, str] = {}
    if report is not None:
        charts["latency"] = json_for_script(latency_chart(report))
        if report.get("accuracy"):
            charts["accuracy"] = json_for_script(accuracy_chart(report))
    charts.update(_ranges_chart(table))
    if ranking is not None and ranking.report is not None:
        charts["sensitivity"] = json_for_script(sensitivity_chart(ranking.report))
    return {
        "b": build,
        "model": model,
        "dataset": dataset,
        "logs": logs,
        "report": report,
        "summary": summary_of(build, report),
        "stages": stages_of(build),
        "table": table,
        "sensitivity": ranking,
        "charts": charts,
        "reproduce": _reproduce_script(state, build_id, request_json, model, dataset),
    }


@router.get("/builds/{build_id}", response_class=Response)
async def build_page(
    request: Request,
    state: StateDep,
    build_id: str,
    q: _TableSearch = "",
    tpage: _TablePage = 1,
) -> Response:
    return await page(
        request, state, "build.html", lambda v: _build_context(state, v, build_id, q, tpage)
    )


@router.get("/builds/{build_id}/results", response_class=Response)
async def build_results(request: Request, state: StateDep, build_id: str) -> Response:
    """The results part of the build page (swapped in when the build ends)."""
    return await page(request, state, "_results.html", lambda v: _build_context(state, v, build_id))


@router.get("/builds/{build_id}/calibration", response_class=Response)
async def build_calibration(
    request: Request,
    state: StateDep,
    build_id: str,
    q: _TableSearch = "",
    tpage: _TablePage = 1,
) -> Response:
    """The calibration section of the build page, filtered and paged (its search swaps it):
    reads the build row and its table only."""

    def gather(viewer: Viewer) -> dict[str, Any]:
        with state.db.session() as session:
            row = visible_build(session, build_id, viewer)
            table = _table_page(session, state, row.table_id, q, tpage)
            build = builds.build_public(row)
        return {"b": build, "table": table, "charts": _ranges_chart(table)}

    return await page(request, state, "_calibration.html", gather)


def _reproduce_script(
    state: AppState, build_id: str, request_json: dict[str, Any], model: Any, dataset: Any
) -> str:
    body = json.dumps(request_json, indent=2, sort_keys=True).replace("'", "'\\''")
    return (
        "#!/bin/sh\n"
        f"# Submits build {build_id} again: the same model, dataset and options.\n"
        f"# model   {model.filename}  id {model.id}\n"
        f"# dataset {dataset.filename}  id {dataset.id}  sha256 {dataset.sha256}\n"
        "# (upload them first with POST /v1/models and /v1/datasets on another server)\n"
        "set -eu\n"
        f'TRTFORGE_URL="${{TRTFORGE_URL:-{state.settings.base_url}}}"\n'
        'curl -fsS -X POST "$TRTFORGE_URL/v1/builds" \\\n'
        '  -H "Authorization: Bearer ${TRTFORGE_TOKEN:-}" \\\n'
        "  -H 'Content-Type: application/json' \\\n"
        f"  --data '{body}'\n"
    )


@router.get("/builds/{build_id}/reproduce.sh", response_class=PlainTextResponse)
async def reproduce(request: Request, state: StateDep, build_id: str) -> Response:
    """The build's request as a script that submits it again (curl against the REST API)."""
    try:
        viewer = await viewer_of(request, state)
        context = await run_in_threadpool(_build_context, state, viewer, build_id)
    except TrtforgeError as exc:
        denied = isinstance(exc, AuthenticationError | PermissionDeniedError)
        return sign_in_page(exc, request, state) if denied else error_page(exc, None)
    return PlainTextResponse(
        context["reproduce"],
        headers={"Content-Disposition": f'attachment; filename="reproduce-{build_id[:12]}.sh"'},
    )


@router.get("/static/{name}", response_class=FileResponse)
async def static(name: str) -> Response:
    """The dashboard's scripts, styles and the vendored chart library (with its license)."""
    path = STATIC / name
    kind = _STATIC_TYPES.get(path.suffix)
    if kind is None or "/" in name or name.startswith(".") or not path.is_file():
        raise NotFoundError(f"No static file {name!r}.", hint="The dashboard links its own files.")
    return FileResponse(path, media_type=kind, headers={"Cache-Control": "public, max-age=3600"})


@router.get("/login", response_class=Response)
async def login_page(
    request: Request,
    state: StateDep,
    next_page: Annotated[str, Query(alias="next", max_length=2000)] = "/",
) -> Response:
    """The sign-in form; its hidden CSRF token goes with the nonce cookie handed out here, and
    ``next`` (a page of this dashboard) is where signing in leads."""
    return sign_in_page(None, request, state, next_page=next_page)


@router.post("/login")
def login(
    request: Request,
    state: StateDep,
    token: Annotated[str, Form(max_length=512)],
    csrf_token: Annotated[str, Form(max_length=128)] = "",
    next_page: Annotated[str, Form(alias="next", max_length=2000)] = "/",
) -> Response:
    """Turn a token into a session cookie. Refused (403, the form again) without the sign-in
    form's CSRF token: another site could otherwise sign a browser in with its own token."""
    try:
        check_csrf(request, state, csrf_token)
    except TrtforgeError as exc:
        return sign_in_page(exc, request, state, next_page=next_page)
    with state.db.session() as session:
        try:
            principal = authenticate(session, f"Bearer {token}", Scope.READ, required=True)
        except TrtforgeError as exc:
            return sign_in_page(exc, request, state, next_page=next_page)
    assert principal.token_id is not None
    ttl_s = state.settings.session_ttl_s
    secret = session_secret(state.settings.data_dir)
    value = create_session(token, principal.token_id, secret, ttl_s)
    response = RedirectResponse(safe_next(next_page), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=int(ttl_s),
        path="/",
        secure=secure_cookies(request, state),
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
def logout(request: Request, state: StateDep) -> Response:
    return _signed_out(request, state)


@router.post("/ui/logout")
async def dashboard_logout(request: Request, state: StateDep) -> Response:
    """The dashboard's sign-out button (its form carries the CSRF token)."""
    sent = (await forms.text_fields(request)).get(CSRF_FIELD)
    try:
        check_csrf(request, state, sent)
    except TrtforgeError as exc:
        return error_page(exc, None)
    return _signed_out(request, state)


def _signed_out(request: Request, state: AppState) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        secure=secure_cookies(request, state),
        httponly=True,
        samesite="strict",
    )
    return response
