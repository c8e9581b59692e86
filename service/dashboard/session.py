"""Who is looking at a dashboard page, and the CSRF token its forms carry.

Pages authenticate as the API's GET routes do (:func:`service.api.auth.authenticate_request`):
the ``Authorization`` header, else the signed session cookie, else anonymous when the server
requires no token. Requests that change state (``POST /ui/...``) also accept the session cookie,
but only with a CSRF token: the form field ``csrf_token`` or the header ``X-CSRF-Token``.

The token is an HMAC, under the server's session secret, of a random nonce kept in an HttpOnly,
``SameSite=Strict`` cookie (:data:`CSRF_COOKIE`). A page from another site can neither read the
nonce nor compute the MAC, so it cannot forge a form post even where a browser sends the cookies
along (the edge guard refuses cross-site posts as well).

The sign-in form carries the token too (``POST /login`` is refused without it): the nonce
cookie is handed out before there is a session, with the sign-in page, so another site cannot
sign a victim's browser in with the attacker's token (login CSRF) and have them upload into the
attacker's project.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api.auth import SESSION_COOKIE, Principal, authenticate_request, session_secret
from service.api.deps import AppState
from service.errors import PermissionDeniedError
from service.schemas import Scope

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "Viewer",
    "authorize_change",
    "check_csrf",
    "csrf_nonce",
    "csrf_token",
    "remember_csrf",
    "secure_cookies",
    "set_csrf_cookie",
    "viewer_of",
]

CSRF_COOKIE = "trtforge_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_NONCE_BYTES = 24
_CSRF_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True)
class Viewer:
    """The caller of a page: who, what they may do, and what their forms carry."""

    principal: Principal
    csrf: str
    """The CSRF token for this browser (hidden field of every form)."""
    nonce: str
    new_nonce: bool
    """Whether the response must set :data:`CSRF_COOKIE` (a first visit)."""
    auth_required: bool
    signed_in: bool

    @property
    def can_build(self) -> bool:
        """Whether launch, upload and cancel buttons are shown (scope ``build`` or wider)."""
        return self.principal.allows(Scope.BUILD)

    def can(self, needed: Scope) -> bool:
        """Whether the viewer's scope allows ``needed`` (anyone, with authentication off)."""
        return self.principal.allows(needed)


def _mac(secret: bytes, nonce: str) -> str:
    digest = hmac.new(secret, f"trtforge-csrf:{nonce}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def csrf_token(state: AppState, nonce: str) -> str:
    """The CSRF token that goes with ``nonce`` (the cookie's value)."""
    return _mac(session_secret(state.settings.data_dir), nonce)


def csrf_nonce(request: Request) -> tuple[str, bool]:
    """This browser's CSRF nonce (its cookie), or a new one and True when it has none yet."""
    value = request.cookies.get(CSRF_COOKIE, "")
    if 16 <= len(value) <= 64 and value.replace("-", "").replace("_", "").isalnum():
        return value, False
    return secrets.token_urlsafe(_NONCE_BYTES), True


def secure_cookies(request: Request, state: AppState) -> bool:
    """``Secure`` cookies behind TLS: the setting, else the request's scheme (uvicorn takes it
    from ``X-Forwarded-Proto`` when the proxy is in ``forwarded_allow_ips``)."""
    if state.settings.cookie_secure is not None:
        return state.settings.cookie_secure
    return request.url.scheme == "https"


def remember_csrf(response: Response, request: Request, state: AppState, viewer: Viewer) -> None:
    """Set the CSRF nonce cookie on a page that handed out a new one."""
    if viewer.new_nonce:
        set_csrf_cookie(response, request, state, viewer.nonce)


def set_csrf_cookie(response: Response, request: Request, state: AppState, nonce: str) -> None:
    """Give this browser the CSRF nonce ``nonce`` (HttpOnly, ``SameSite=Strict``)."""
    response.set_cookie(
        CSRF_COOKIE,
        nonce,
        max_age=_CSRF_TTL_S,
        path="/",
        secure=secure_cookies(request, state),
        httponly=True,
        samesite="strict",
    )


async def viewer_of(request: Request, state: AppState, needed: Scope = Scope.READ) -> Viewer:
    """The caller of a page (raises :class:`AuthenticationError` or
    :class:`PermissionDeniedError`, which pages turn into the sign-in page)."""
    authorization = request.headers.get("authorization")
    cookie = request.cookies.get(SESSION_COOKIE)

    def lookup() -> Principal:
        with state.db.session() as session:
            return authenticate_request(
                session,
                authorization=authorization,
                session_cookie=cookie,
                secret=session_secret(state.settings.data_dir),
                needed=needed,
                required=state.settings.auth_required,
            )

    principal = await run_in_threadpool(lookup)
    nonce, new = csrf_nonce(request)
    return Viewer(
        principal=principal,
        csrf=csrf_token(state, nonce),
        nonce=nonce,
        new_nonce=new,
        auth_required=state.settings.auth_required,
        signed_in=cookie is not None and principal.token_id is not None,
    )


def check_csrf(request: Request, state: AppState, sent_csrf: str | None) -> None:
    """Refuse (:class:`PermissionDeniedError`) a form post whose CSRF token (the field, else the
    ``X-CSRF-Token`` header) does not match this browser's nonce cookie."""
    nonce, new = csrf_nonce(request)
    sent = sent_csrf or request.headers.get(CSRF_HEADER) or ""
    if new or not hmac.compare_digest(sent.encode(), csrf_token(state, nonce).encode()):
        raise PermissionDeniedError(
            "The form has no valid CSRF token.",
            hint="Reload the page and submit the form again (forms are only accepted from this "
            "dashboard's own pages).",
            field=CSRF_FIELD,
        )


async def authorize_change(request: Request, state: AppState, sent_csrf: str | None) -> Viewer:
    """The caller of a dashboard request that changes state: scope ``build`` and a CSRF token
    matching this browser's nonce (:class:`PermissionDeniedError` otherwise)."""
    check_csrf(request, state, sent_csrf)
    return await viewer_of(request, state, Scope.BUILD)
