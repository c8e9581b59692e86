"""Dashboard routes: ``/`` (builds with status, links to reports and artifacts), ``/login`` (signs
in with a token when the server requires one: the cookie holds a signed, expiring session, never
the token) and ``/logout``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core.errors import TrtforgeError
from service.api.auth import (
    SESSION_COOKIE,
    authenticate,
    authenticate_request,
    create_session,
    session_secret,
)
from service.api.deps import AppState, StateDep
from service.dashboard.render import render
from service.schemas import BuildStatus, Scope
from service.store import builds

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_PAGE_SIZE = 50
_MAX_PAGE = 1_000_000


@router.get("/", response_class=HTMLResponse)
def index(
    request: Request,
    state: StateDep,
    status: Annotated[BuildStatus | None, Query()] = None,
    page: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 1,
) -> Response:
    with state.db.session() as session:
        try:
            authenticate_request(
                session,
                authorization=request.headers.get("authorization"),
                session_cookie=request.cookies.get(SESSION_COOKIE),
                secret=session_secret(state.settings.data_dir),
                needed=Scope.READ,
                required=state.settings.auth_required,
            )
        except TrtforgeError as exc:
            return HTMLResponse(render("login.html", error=exc.message), status_code=401)
        listing = builds.list_builds(session, _PAGE_SIZE, (page - 1) * _PAGE_SIZE, status=status)
        rows = [builds.build_public(r) for r in listing.items]
    return HTMLResponse(
        render(
            "index.html",
            builds=rows,
            total=listing.total,
            page=page,
            pages=max(1, -(-listing.total // _PAGE_SIZE)),
            status=status.value if status else "",
            statuses=[s.value for s in BuildStatus],
            signed_in=SESSION_COOKIE in request.cookies,
        )
    )


@router.get("/login", response_class=HTMLResponse)
def login_page() -> HTMLResponse:
    return HTMLResponse(render("login.html", error=None))


def _secure(request: Request, state: AppState) -> bool:
    """``Secure`` cookies behind TLS: the setting, else the request's scheme (uvicorn takes it
    from ``X-Forwarded-Proto`` when the proxy is in ``forwarded_allow_ips``)."""
    if state.settings.cookie_secure is not None:
        return state.settings.cookie_secure
    return request.url.scheme == "https"


@router.post("/login")
def login(
    request: Request, state: StateDep, token: Annotated[str, Form(max_length=512)]
) -> Response:
    with state.db.session() as session:
        try:
            principal = authenticate(session, f"Bearer {token}", Scope.READ, required=True)
        except TrtforgeError as exc:
            return HTMLResponse(render("login.html", error=exc.message), status_code=401)
    assert principal.token_id is not None
    ttl_s = state.settings.session_ttl_s
    value = create_session(token, principal.token_id, session_secret(state.settings.data_dir), ttl_s)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=int(ttl_s),
        path="/",
        secure=_secure(request, state),
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
def logout(request: Request, state: StateDep) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE, path="/", secure=_secure(request, state), httponly=True, samesite="strict"
    )
    return response
