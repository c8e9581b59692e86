"""``/v1/tokens`` (admin scope): create (the secret is returned once; the token belongs to the
project named in the body, ``default`` if none), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api import auth
from service.api.deps import AdminAccess, SessionDep
from service.api.projects import ProjectQuery
from service.schemas import TokenCreate, TokenCreated, TokenPublic

__all__ = ["router"]

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.get("", operation_id="list_tokens", response_model=list[TokenPublic])
def list_tokens(
    session: SessionDep, _: AdminAccess, project: ProjectQuery = None
) -> list[TokenPublic]:
    rows = auth.list_tokens(session)
    return [auth.token_public(r) for r in rows if project is None or r.project == project]


@router.post("", operation_id="create_token", status_code=201, response_model=TokenCreated)
def create_token(body: TokenCreate, session: SessionDep, _: AdminAccess) -> TokenCreated:
    row, token = auth.create_token(session, body.name, body.scope, body.project)
    return TokenCreated(**auth.token_public(row).model_dump(), token=token)


@router.delete("/{token_id}", operation_id="revoke_token", status_code=204)
def revoke_token(token_id: str, session: SessionDep, _: AdminAccess) -> Response:
    auth.revoke_token(session, token_id)
    return Response(status_code=204)
