"""Bearer tokens with scopes ``read < build < admin``; only a hash of each token is stored.

Each token belongs to a project (:mod:`service.projects`): it sees and changes that project's
data only, except admin tokens, which see every project's (:class:`Principal`).

A token reads ``tfk_<id>_<secret>``: the id names it in listings and revocations, the secret is
32 random bytes. The database keeps sha256(token), which is enough for high-entropy secrets (no
password-style stretching is needed), and the token itself is shown once, when created.

The dashboard signs in with a token and keeps a *session* in its cookie, never the token:
``<token id>.<expiry>.<mac>``, the MAC an HMAC-SHA256 under a server secret kept in the data
directory (``session.key``, 0600) over the id, the expiry and the token's stored hash. The cookie
is worth nothing after it expires, after the token is revoked, or once the secret file is
replaced, and it cannot be turned back into the token.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import TokenRow, utcnow
from service.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from service.projects import DEFAULT_PROJECT
from service.schemas import Scope, TokenPublic

__all__ = [
    "ANONYMOUS",
    "SESSION_COOKIE",
    "TOKEN_PREFIX",
    "Principal",
    "authenticate",
    "authenticate_request",
    "authenticate_session",
    "create_session",
    "create_token",
    "hash_token",
    "list_tokens",
    "revoke_token",
    "session_secret",
    "token_public",
]

TOKEN_PREFIX = "tfk_"  # noqa: S105 - a prefix, not a secret
SESSION_COOKIE = "trtforge_session"
"""The dashboard's sign-in (a signed session value, module docstring); honoured for GET only."""
_SECRET_FILE = "session.key"  # noqa: S105 - a file name
_SECRET_BYTES = 32
_LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token (or everyone, when authentication is off), and its project."""

    token_id: str | None
    name: str
    scope: Scope
    project: str = DEFAULT_PROJECT

    def allows(self, needed: Scope) -> bool:
        return self.scope.allows(needed)

    @property
    def all_projects(self) -> bool:
        """Whether it sees and manages every project (admin tokens; everyone with
        authentication off)."""
        return self.scope is Scope.ADMIN

    @property
    def visible(self) -> str | None:
        """The project whose rows it may read, change and delete by id; None: every project.
        Another project's row answers 404, as an unknown id does (never 403: that would tell
        that it exists)."""
        return None if self.all_projects else self.project

    def listing(self, requested: str | None) -> str | None:
        """The project a listing shows: for an admin the one asked for (None: all of them);
        for other tokens their own (naming another is refused, whether it exists or not)."""
        if self.all_projects:
            return requested
        return self.home(requested)

    def home(self, requested: str | None) -> str:
        """The project that new uploads go to: the one asked for (admins only), else the
        token's own."""
        if requested is None or requested == self.project:
            return self.project
        if not self.all_projects:
            raise PermissionDeniedError(
                f"Token {self.name!r} belongs to project {self.project!r}; only admin tokens "
                "work in other projects.",
                hint="Leave out ?project= (it defaults to the token's project), or use a token "
                "of that project.",
                field="project",
            )
        return requested


ANONYMOUS = Principal(token_id=None, name="anonymous (authentication off)", scope=Scope.ADMIN)


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session, name: str, scope: Scope, project: str = DEFAULT_PROJECT
) -> tuple[TokenRow, str]:
    """Store a new token of ``project`` (a checked name, :data:`service.projects.PROJECT_PATTERN`)
    and return the row with the token (shown once). Commits."""
    token_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    row = TokenRow(
        id=token_id,
        name=name,
        scope=Scope(scope).value,
        secret_hash=hash_token(token),
        project=project,
    )
    session.add(row)
    session.commit()
    return row, token


def list_tokens(session: Session) -> list[TokenRow]:
    return list(session.scalars(select(TokenRow).order_by(TokenRow.created_at)))


def revoke_token(session: Session, token_id: str) -> TokenRow:
    """Revoke a token by id (idempotent). Commits."""
    row = session.get(TokenRow, token_id)
    if row is None:
        raise NotFoundError(
            f"No token with id {token_id!r}.",
            hint="`trtforge tokens list` shows the ids.",
            field="token_id",
        )
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def authenticate(
    session: Session, authorization: str | None, needed: Scope, *, required: bool
) -> Principal:
    """The caller of a request with this ``Authorization`` header, checked for ``needed``.

    With authentication off (``required=False``) a missing header means :data:`ANONYMOUS`;
    a header that is sent is still checked.
    """
    if not authorization:
        if not required:
            return ANONYMOUS
        raise AuthenticationError("This server requires a bearer token.")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "The Authorization header must be 'Bearer <token>'.", field="authorization"
        )
    row = session.scalar(select(TokenRow).where(TokenRow.secret_hash == hash_token(token)))
    if row is None or row.revoked_at is not None:
        raise AuthenticationError(
            "The bearer token is unknown or revoked.",
            hint="Ask an admin for a new token (`trtforge tokens create`).",
            field="authorization",
        )
    return _principal(session, row, needed)


def _principal(session: Session, row: TokenRow, needed: Scope) -> Principal:
    """The caller holding ``row`` (a live token), checked for ``needed``; notes the use."""
    principal = Principal(
        token_id=row.id, name=row.name, scope=Scope(row.scope), project=row.project
    )
    if not principal.allows(needed):
        raise PermissionDeniedError(
            f"Token {row.name!r} has scope {row.scope!r}; this request needs {needed.value!r}."
        )
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return principal


def authenticate_request(
    session: Session,
    *,
    authorization: str | None,
    session_cookie: str | None,
    secret: bytes,
    needed: Scope,
    required: bool,
) -> Principal:
    """The caller of a request: its ``Authorization`` header, else its dashboard session cookie
    (pass ``None`` where cookies must not count: requests that change state), else anonymous
    when authentication is off (a stale cookie is then ignored)."""
    if not authorization and session_cookie:
        try:
            return authenticate_session(session, session_cookie, secret, needed)
        except AuthenticationError:
            if required:
                raise
    return authenticate(session, authorization, needed, required=required)


@functools.cache
def session_secret(data_dir: Path) -> bytes:
    """The server secret that signs sessions: ``<data_dir>/session.key`` (0600), created on first
    use. Several servers sharing the directory agree on it (created with a hard link, which
    fails when another process won)."""
    path = data_dir / _SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{_SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(_SECRET_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) < _SECRET_BYTES:
        raise AuthenticationError(
            f"The session secret {_SECRET_FILE!r} in the data directory is damaged.",
            hint=f"Delete {_SECRET_FILE!r} in the data directory and restart (sessions end).",
        )
    return secret


def _session_mac(secret: bytes, token_id: str, expires: int, secret_hash: str) -> str:
    message = f"trtforge-session:{token_id}.{expires}.{secret_hash}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def create_session(token: str, token_id: str, secret: bytes, ttl_s: float) -> str:
    """The session cookie value for a signed-in ``token`` (already authenticated)."""
    expires = int(time.time() + ttl_s)
    return f"{token_id}.{expires}.{_session_mac(secret, token_id, expires, hash_token(token))}"


def authenticate_session(session: Session, value: str, secret: bytes, needed: Scope) -> Principal:
    """The caller of a dashboard session cookie, checked for ``needed``."""
    token_id, _, rest = value.partition(".")
    expires_text, _, mac = rest.partition(".")
    expired = AuthenticationError(
        "The dashboard session is invalid or has expired.",
        hint="Sign in again at /login.",
        field="session",
    )
    if not (token_id and expires_text.isdigit() and len(expires_text) <= 12 and mac):
        raise expired
    expires = int(expires_text)
    row = session.get(TokenRow, token_id) if expires > time.time() else None
    if row is None or row.revoked_at is not None:
        raise expired
    if not hmac.compare_digest(mac, _session_mac(secret, token_id, expires, row.secret_hash)):
        raise expired
    return _principal(session, row, needed)


def token_public(row: TokenRow) -> TokenPublic:
    return TokenPublic(
        id=row.id,
        name=row.name,
        scope=Scope(row.scope),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
        project=row.project,
    )
