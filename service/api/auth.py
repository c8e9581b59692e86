"""Bearer tokens with scopes ``read < build < admin``; only a hash of each token is stored.

A token reads ``tfk_<id>_<secret>``: the id names it in listings and revocations, the secret is
32 random bytes. The database keeps sha256(token), which is enough for high-entropy secrets (no
password-style stretching is needed), and the token itself is shown once, when created.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import TokenRow, utcnow
from service.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from service.schemas import Scope, TokenPublic

__all__ = [
    "ANONYMOUS",
    "TOKEN_PREFIX",
    "Principal",
    "authenticate",
    "create_token",
    "hash_token",
    "list_tokens",
    "revoke_token",
    "token_public",
]

TOKEN_PREFIX = "tfk_"  # noqa: S105 - a prefix, not a secret
_LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token (or everyone, when authentication is off)."""

    token_id: str | None
    name: str
    scope: Scope

    def allows(self, needed: Scope) -> bool:
        return self.scope.allows(needed)


ANONYMOUS = Principal(token_id=None, name="anonymous (authentication off)", scope=Scope.ADMIN)


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str, scope: Scope) -> tuple[TokenRow, str]:
    """Store a new token's hash and return the row with the token (shown once). Commits."""
    token_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    row = TokenRow(id=token_id, name=name, scope=Scope(scope).value, secret_hash=hash_token(token))
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
    principal = Principal(token_id=row.id, name=row.name, scope=Scope(row.scope))
    if not principal.allows(needed):
        raise PermissionDeniedError(
            f"Token {row.name!r} has scope {row.scope!r}; this request needs {needed.value!r}."
        )
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return principal


def token_public(row: TokenRow) -> TokenPublic:
    return TokenPublic(
        id=row.id,
        name=row.name,
        scope=Scope(row.scope),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )
