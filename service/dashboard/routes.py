"""Dashboard routes: ``/`` (builds with status, links to reports and artifacts) and ``/login``
(stores a token in an HttpOnly cookie when the server requires authentication)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core.errors import TrtforgeError
from service.api.auth import authenticate
from service.api.deps import TOKEN_COOKIE, StateDep
from service.dashboard.render import render
from service.schemas import BuildStatus, Scope
from service.store import builds

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index(
    request: Request,
    state: StateDep,
    status: Annotated[BuildStatus | None, Query()] = None,
    page: Annotated[int, Query(ge=1)] = 1,
) -> Response:
    token = request.cookies.get(TOKEN_COOKIE)
    header = request.headers.get("authorization") or (f"Bearer {token}" if token else None)
    size = 50
    with state.db.session() as session:
        try:
            authenticate(session, header, Scope.READ, required=state.settings.auth_required)
        except TrtforgeError as exc:
            return HTMLResponse(render("login.html", error=exc.message), status_code=401)
        listing = builds.list_builds(session, size, (page - 1) * size, status=status)
        rows = [builds.build_public(r) for r in listing.items]
    return HTMLResponse(
        render(
            "index.html",
            builds=rows,
            total=listing.total,
            page=page,
            pages=max(1, -(-listing.total // size)),
            status=status.value if status else "",
            statuses=[s.value for s in BuildStatus],
        )
    )


@router.get("/login", response_class=HTMLResponse)
def login_page() -> HTMLResponse:
    return HTMLResponse(render("login.html", error=None))


@router.post("/login")
def login(state: StateDep, token: Annotated[str, Form()]) -> Response:
    with state.db.session() as session:
        try:
            authenticate(session, f"Bearer {token}", Scope.READ, required=True)
        except TrtforgeError as exc:
            return HTMLResponse(render("login.html", error=exc.message), status_code=401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
    return response
