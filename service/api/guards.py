"""The HTTP edge: what every request must pass before the application sees its body.

A pure ASGI middleware (:class:`EdgeGuard`), outermost after Starlette's error middleware, so
nothing inside reads a byte of a body it would refuse. In order:

1. **Host** names one of ``allowed_hosts`` (by default the loopback names on a loopback bind):
   a page on an attacker's domain that re-resolves to 127.0.0.1 (DNS rebinding) gets 421.
2. **CORS** is off unless ``cors_origins`` lists origins: a preflight from a listed origin gets
   204 with the CORS headers, any other preflight 403; answers to listed origins carry
   ``Access-Control-Allow-Origin`` (no credentials: the API authenticates by bearer token).
3. **CSRF**: a request that changes state (not GET/HEAD/OPTIONS) from another site's page
   (``Sec-Fetch-Site`` cross-site/same-site, else an ``Origin`` whose host is not ``Host``) is
   refused with 403 unless it carries an ``Authorization`` header (which a browser adds
   cross-origin only after a CORS preflight allows it) or its origin is listed. The session
   cookie never authenticates such requests.
4. **Bodies**: a request that changes state and has a body is authenticated *before* its body is
   read (401 without a valid token when tokens are required), and every body is capped: the
   upload routes at ``max_upload_bytes`` plus multipart framing, everything else at
   ``max_json_body_bytes``. A declared ``Content-Length`` over the cap answers 413 at once; an
   undeclared (chunked) body is counted as it arrives and answered 413 when it passes the cap.
   Refusals of unread bodies close the connection, so the server neither reads nor keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as ASGIScope

from core.errors import TrtforgeError
from service.api.auth import authenticate
from service.api.errors import response_for_error
from service.db import Database
from service.errors import (
    AuthenticationError,
    CrossOriginError,
    HostNotAllowedError,
    PayloadTooLargeError,
)
from service.schemas import Scope
from service.settings import Settings, is_loopback

__all__ = [
    "CORS_ALLOWED_HEADERS",
    "CORS_EXPOSED_HEADERS",
    "MULTIPART_OVERHEAD_BYTES",
    "UPLOAD_ROUTES",
    "EdgeGuard",
    "EdgePolicy",
    "host_name",
]

UPLOAD_ROUTES = frozenset(
    {
        ("POST", "/v1/models"),
        ("POST", "/v1/datasets"),
        ("POST", "/v1/calibration-tables"),
        ("POST", "/v1/worker/uploads"),
    }
)
"""The routes that stream multipart uploads (capped at ``max_upload_bytes``, not the JSON cap)."""
MULTIPART_OVERHEAD_BYTES = 1 << 20
"""Multipart framing and text fields allowed on top of an upload's file size."""
PUBLIC_BODY_PATHS = frozenset({"/login"})
"""Routes that take a body without a token (the dashboard's sign-in form)."""
DASHBOARD_UPLOAD_ROUTES = frozenset({("POST", "/ui/models"), ("POST", "/ui/datasets")})
"""The dashboard's uploads (``service/dashboard/forms.py``; not in the OpenAPI schema): capped
as the upload routes are."""
DASHBOARD_FORMS_PREFIX = "/ui/"
"""The dashboard's form posts: they authenticate with the session cookie and a CSRF token in
the route (:mod:`service.dashboard.session`), not with a bearer token here."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CORS_ALLOWED_HEADERS = (
    "Authorization, Content-Type, Range, If-Range, If-None-Match, Last-Event-ID, Accept"
)
CORS_EXPOSED_HEADERS = (
    "Content-Range, Content-Length, Content-Disposition, Accept-Ranges, ETag, Location, "
    "WWW-Authenticate"
)
_CORS_METHODS = "GET, HEAD, POST, PATCH, DELETE"
_CORS_MAX_AGE_S = "600"


def host_name(value: str) -> str:
    """The name in a ``Host`` header or an origin's authority: lower case, no port, no
    brackets, no trailing dot (``[::1]:8000`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        name = value[1 : value.find("]")] if "]" in value else value[1:]
    else:
        name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".")


def _authority(value: str) -> str:
    """``host[:port]`` without a default port (http's 80 or https's 443), lower case."""
    value = value.strip().lower()
    for default in (":80", ":443"):
        if value.endswith(default):
            return value.removesuffix(default)
    return value


@dataclass(frozen=True)
class EdgePolicy:
    """What :class:`EdgeGuard` enforces, derived once from the settings."""

    hosts: frozenset[str] | None
    """Allowed Host names; ``None``: any."""
    cors_origins: frozenset[str]
    cors_any: bool
    json_body_bytes: int
    upload_body_bytes: int
    auth_required: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgePolicy:
        names = settings.allowed_hosts
        if names is None:
            names = [*LOOPBACK_NAMES, settings.host] if is_loopback(settings.host) else ["*"]
        hosts = None if "*" in names else frozenset(host_name(n) for n in names)
        return cls(
            hosts=hosts,
            cors_origins=frozenset(settings.cors_origins) - {"*"},
            cors_any="*" in settings.cors_origins,
            json_body_bytes=settings.max_json_body_bytes,
            upload_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
            auth_required=settings.auth_required,
        )

    def allows_origin(self, origin: str) -> bool:
        return self.cors_any or origin.lower() in self.cors_origins


@dataclass
class _Request:
    """The parts of an ASGI scope the checks read."""

    method: str
    path: str
    headers: dict[str, str]

    @classmethod
    def of(cls, scope: ASGIScope) -> _Request:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return cls(scope["method"].upper(), scope.get("path", ""), headers)

    @property
    def declared_bytes(self) -> int | None:
        text = self.headers.get("content-length", "").strip()
        return int(text) if text.isdigit() and len(text) < 20 else None

    @property
    def has_body(self) -> bool:
        declared = self.declared_bytes
        return bool(declared) or "transfer-encoding" in self.headers or (
            "content-length" in self.headers and declared is None
        )

    def cross_site(self) -> bool:
        """Whether a browser sent this from another origin's page (non-browsers never are)."""
        fetch_site = self.headers.get("sec-fetch-site")
        if fetch_site is not None:  # browsers set it and pages cannot forge it
            return fetch_site.strip().lower() not in ("same-origin", "none")
        origin = self.headers.get("origin")
        if origin is None:
            return False
        _scheme, _, authority = origin.partition("://")
        return _authority(authority) != _authority(self.headers.get("host", ""))


class EdgeGuard:
    """The ASGI middleware (module docstring). ``db`` authenticates bodies before they are read."""

    def __init__(self, app: ASGIApp, *, settings: Settings, db: Database) -> None:
        self.app = app
        self.policy = EdgePolicy.from_settings(settings)
        self.data_dir = settings.data_dir
        self.db = db

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _Request.of(scope)
        try:
            self._check_host(request)
            origin = request.headers.get("origin")
            cors = origin is not None and request.cross_site() and self.policy.allows_origin(origin)
            if request.method == "OPTIONS" and origin and self._preflight(request):
                await self._answer_preflight(origin if cors else None, send)
                return
            self._check_cross_site(request, cors)
            limit = self._body_limit(request)
            if request.method not in SAFE_METHODS and request.has_body:
                await self._authenticate_early(request)
            declared = request.declared_bytes
            if declared is not None and declared > limit:
                raise self._too_large(request, limit)
        except TrtforgeError as exc:
            await self._refuse(exc, request, send)
            return
        await self._forward(scope, receive, send, limit, origin if cors else None)

    # -- checks ------------------------------------------------------------------------------

    def _check_host(self, request: _Request) -> None:
        if self.policy.hosts is None:
            return
        host = request.headers.get("host", "")
        if host_name(host) not in self.policy.hosts:
            raise HostNotAllowedError(
                f"This server does not answer for the host {host!r}."
                if host
                else "The request has no Host header.",
                field="host",
            )

    @staticmethod
    def _preflight(request: _Request) -> bool:
        return "access-control-request-method" in request.headers

    def _check_cross_site(self, request: _Request, cors: bool) -> None:
        if request.method in SAFE_METHODS or cors or "authorization" in request.headers:
            return
        if request.cross_site():
            origin = request.headers.get("origin", "another site")
            raise CrossOriginError(
                f"A page from {origin} may not {request.method} {request.path} on this server."
            )

    def _body_limit(self, request: _Request) -> int:
        route = (request.method, request.path.rstrip("/") or "/")
        if route in UPLOAD_ROUTES or route in DASHBOARD_UPLOAD_ROUTES:
            return self.policy.upload_body_bytes
        return self.policy.json_body_bytes

    def _too_large(self, request: _Request, limit: int) -> PayloadTooLargeError:
        upload = limit == self.policy.upload_body_bytes and limit != self.policy.json_body_bytes
        return PayloadTooLargeError(
            f"The request body is larger than the {limit} bytes {request.path} accepts.",
            hint="Raise TRTFORGE_MAX_UPLOAD_BYTES on the server, or upload a smaller file."
            if upload
            else "Send a smaller body (files go to the upload routes, as multipart/form-data), "
            "or raise TRTFORGE_MAX_JSON_BODY_BYTES on the server.",
            field="body",
        )

    async def _authenticate_early(self, request: _Request) -> None:
        """401/403 before the body is read; the route checks the exact scope again."""
        if request.path in PUBLIC_BODY_PATHS or request.path.startswith(DASHBOARD_FORMS_PREFIX):
            return
        authorization = request.headers.get("authorization")
        if not authorization and not self.policy.auth_required:
            return
        if not authorization:
            raise AuthenticationError("This server requires a bearer token.")

        def check() -> None:
            with self.db.session() as session:
                authenticate(session, authorization, Scope.READ, required=True)

        await run_in_threadpool(check)

    # -- answers ------------------------------------------------------------------------------

    async def _refuse(self, exc: TrtforgeError, request: _Request, send: Send) -> None:
        response = response_for_error(exc, self.data_dir)
        if request.has_body:  # unread: close rather than read (or keep) the rest of it
            response.headers["Connection"] = "close"
        await response({"type": "http", "method": request.method}, _no_body, send)

    async def _answer_preflight(self, origin: str | None, send: Send) -> None:
        if origin is None:
            refusal = CrossOriginError(
                "Cross-origin requests are not allowed from this page's origin.",
                hint="An admin lists allowed origins in TRTFORGE_CORS_ORIGINS (off by default).",
            )
            response = response_for_error(refusal, self.data_dir)
            await response({"type": "http", "method": "OPTIONS"}, _no_body, send)
            return
        headers = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", _CORS_METHODS.encode()),
            (b"access-control-allow-headers", CORS_ALLOWED_HEADERS.encode()),
            (b"access-control-max-age", _CORS_MAX_AGE_S.encode()),
            (b"vary", b"Origin"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _forward(
        self, scope: ASGIScope, receive: Receive, send: Send, limit: int, cors_origin: str | None
    ) -> None:
        """Run the app with the body counted against ``limit`` and CORS headers added."""
        received = 0
        exceeded: PayloadTooLargeError | None = None
        started = False
        request = _Request.of(scope)

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = self._too_large(request, limit)
                    raise exceeded
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded is not None:  # whatever the app answers, the answer is 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(exceeded, request, send)
                return
            if message["type"] == "http.response.start":
                started = True
                if cors_origin is not None:
                    message["headers"] = [
                        *message.get("headers", ()),
                        (b"access-control-allow-origin", cors_origin.encode("latin-1")),
                        (b"access-control-expose-headers", CORS_EXPOSED_HEADERS.encode()),
                        (b"vary", b"Origin"),
                    ]
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except PayloadTooLargeError:
            if exceeded is None or started:
                raise
            await self._refuse(exceeded, request, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
