from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from service.api.auth import (
    ANONYMOUS,
    authenticate,
    create_token,
    hash_token,
    list_tokens,
    revoke_token,
)
from service.db import Database
from service.db.models import TokenRow
from service.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from service.schemas import Scope


@pytest.fixture
def db(db_url: str) -> Database:
    database = Database(db_url)
    database.migrate()
    yield database  # type: ignore[misc]
    database.dispose()


def test_tokens_are_stored_hashed_and_shown_once(db: Database) -> None:
    with db.session() as session:
        row, token = create_token(session, "ci", Scope.BUILD)
    assert token.startswith(f"tfk_{row.id}_")
    with db.session() as session:
        stored = session.scalars(select(TokenRow)).one()
        assert stored.secret_hash == hash_token(token)
        assert token not in (stored.secret_hash, stored.id, stored.name)


@pytest.mark.parametrize(
    ("scope", "needed", "allowed"),
    [
        (Scope.READ, Scope.READ, True),
        (Scope.READ, Scope.BUILD, False),
        (Scope.BUILD, Scope.READ, True),
        (Scope.BUILD, Scope.ADMIN, False),
        (Scope.ADMIN, Scope.BUILD, True),
    ],
)
def test_scopes_are_ordered(db: Database, scope: Scope, needed: Scope, allowed: bool) -> None:
    with db.session() as session:
        _, token = create_token(session, "t", scope)
        if allowed:
            principal = authenticate(session, f"Bearer {token}", needed, required=True)
            assert principal.scope is scope
            assert principal.name == "t"
        else:
            with pytest.raises(PermissionDeniedError, match=f"needs '{needed.value}'"):
                authenticate(session, f"Bearer {token}", needed, required=True)


def test_missing_malformed_unknown_and_revoked_tokens_are_refused(db: Database) -> None:
    with db.session() as session:
        row, token = create_token(session, "t", Scope.ADMIN)
        with pytest.raises(AuthenticationError, match="requires a bearer token"):
            authenticate(session, None, Scope.READ, required=True)
        with pytest.raises(AuthenticationError, match="Bearer <token>"):
            authenticate(session, f"Basic {token}", Scope.READ, required=True)
        with pytest.raises(AuthenticationError, match="unknown or revoked"):
            authenticate(session, "Bearer tfk_nope", Scope.READ, required=True)
        revoke_token(session, row.id)
        with pytest.raises(AuthenticationError, match="unknown or revoked"):
            authenticate(session, f"Bearer {token}", Scope.READ, required=True)
        with pytest.raises(NotFoundError):
            revoke_token(session, "missing")
        assert [t.revoked_at is not None for t in list_tokens(session)] == [True]


def test_without_required_auth_anonymous_is_admin_but_sent_tokens_are_checked(db: Database) -> None:
    with db.session() as session:
        assert authenticate(session, None, Scope.ADMIN, required=False) is ANONYMOUS
        with pytest.raises(AuthenticationError):
            authenticate(session, "Bearer wrong", Scope.READ, required=False)


def test_last_used_is_recorded(db: Database, tmp_path: Path) -> None:
    with db.session() as session:
        row, token = create_token(session, "t", Scope.READ)
        assert row.last_used_at is None
        authenticate(session, f"Bearer {token}", Scope.READ, required=True)
    with db.session() as session:
        assert session.get_one(TokenRow, row.id).last_used_at is not None
