"""How a dashboard page is answered: find the viewer, gather the page's data off the event loop,
render its template; a viewer without access gets the sign-in page, a missing build or model
an error page, both with the status the API would answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from core.errors import TrtforgeError
from service.api.deps import AppState
from service.api.errors import status_for
from service.dashboard.render import render
from service.dashboard.session import (
    Viewer,
    csrf_nonce,
    csrf_token,
    remember_csrf,
    set_csrf_cookie,
    viewer_of,
)
from service.errors import PermissionDeniedError
from service.schemas import Scope

__all__ = ["error_page", "page", "safe_next", "sign_in_page"]


def safe_next(path: str) -> str:
    """``path`` when it is a page of this dashboard (``/...``; never ``//host`` or a URL, so the
    sign-in form cannot send a browser to another site), else ``/``."""
    local = path.startswith("/") and not path.startswith("//") and "\\" not in path
    page = path.isprintable() and not path.startswith(("/login", "/logout", "/ui/"))
    return path if local and page else "/"


def sign_in_page(
    exc: TrtforgeError | None, request: Request, state: AppState, *, next_page: str | None = None
) -> HTMLResponse:
    """The sign-in form (with ``exc``'s message and status when a page was refused), carrying
    this browser's CSRF token and the page to go back to once signed in; a browser without a
    nonce cookie gets one with it."""
    nonce, new = csrf_nonce(request)
    status = status_for(exc) if exc is not None else 200
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = HTMLResponse(
        render(
            "login.html",
            error=exc.message if exc else None,
            hint=exc.hint if exc else None,
            csrf=csrf_token(state, nonce),
            next=safe_next(next_page or (here if request.method == "GET" else "/")),
            viewer=None,
        ),
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )
    if new:
        set_csrf_cookie(response, request, state, nonce)
    return response


def error_page(exc: TrtforgeError, viewer: Viewer | None) -> HTMLResponse:
    return HTMLResponse(
        render("error.html", error=exc, viewer=viewer), status_code=status_for(exc)
    )


async def page(
    request: Request,
    state: AppState,
    template: str,
    gather: Callable[[Viewer], dict[str, Any]],
    *,
    needed: Scope = Scope.READ,
) -> Response:
    """``template`` rendered with what ``gather(viewer)`` returns (run in a thread: it queries
    the database), plus ``viewer`` and ``request_path``. Without a token: the sign-in page; a
    signed-in viewer whose scope is short of ``needed``: an error page (403) that keeps the
    navigation and offers signing in with another token."""
    try:
        viewer = await viewer_of(request, state)
    except TrtforgeError as exc:
        return sign_in_page(exc, request, state)
    if not viewer.can(needed):
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        short = PermissionDeniedError(
            f"Your token {viewer.principal.name!r} has scope {viewer.principal.scope.value!r}; "
            f"this page needs {needed.value!r}.",
            hint=f"Sign in with a token of scope {needed.value!r} (an admin creates one with "
            f"trtforge tokens create --scope {needed.value}).",
        )
        sign_in = f"/login?next={quote(safe_next(here))}"
        response: Response = HTMLResponse(
            render("error.html", error=short, viewer=viewer, sign_in=sign_in),
            status_code=status_for(short),
        )
    else:
        try:
            context = await run_in_threadpool(gather, viewer)
        except TrtforgeError as exc:
            response = error_page(exc, viewer)
        else:
            html = render(template, viewer=viewer, request_path=request.url.path, **context)
            response = HTMLResponse(html, headers={"Cache-Control": "no-store"})
    remember_csrf(response, request, state, viewer)
    return response
