"""``/v1/builds/{id}/sensitivity``: rank a build's quantizable nodes by INT8 sensitivity (on a
worker, as a build: :mod:`service.store.sensitivity`), and read the ranking as JSON."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.caching import json_response
from service.api.deps import BuildAccess, ReadAccess, StateDep
from service.schemas import SensitivityOptions, SensitivityPublic
from service.store import sensitivity
from service.store.builds import get_build

__all__ = ["router"]

router = APIRouter(prefix="/v1/builds", tags=["sensitivity"])


@router.post(
    "/{build_id}/sensitivity",
    operation_id="request_sensitivity",
    status_code=202,
    response_model=SensitivityPublic,
    responses={200: {"model": SensitivityPublic, "description": "Already asked for."}},
)
def request_sensitivity(
    build_id: str,
    state: StateDep,
    caller: BuildAccess,
    body: SensitivityOptions | None = None,
) -> Response:
    """Rank the build's quantizable nodes (INT8 precisions): its request, run again with
    ``sensitivity`` set, through the queue (202); the same options again answer 200."""
    with state.db.session() as session:
        build, _, created = sensitivity.request_sensitivity(
            session,
            state.storage,
            state.queue,
            build_id,
            body or SensitivityOptions(),
            caller.visible,
        )
        public = sensitivity.sensitivity_public(session, state.storage, build)
    return json_response(
        public, status_code=202 if created else 200, headers={"Location": public.links["self"]}
    )


@router.get(
    "/{build_id}/sensitivity", operation_id="get_sensitivity", response_model=SensitivityPublic
)
def get_sensitivity(build_id: str, state: StateDep, caller: ReadAccess) -> Response:
    """The ranking (``report``, most sensitive node first) once the build computing it has a
    report; its status meanwhile."""
    with state.db.session() as session:
        build = get_build(session, build_id, caller.visible)
        public = sensitivity.sensitivity_public(session, state.storage, build)
    return json_response(public, headers={"Cache-Control": "no-cache"})
