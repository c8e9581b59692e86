"""``/v1/workers``: the build workers, what each builds for (targets and labels), and what each
runs now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from service.api.deps import AppState, ReadAccess, StateDep
from service.db.models import BuildRow
from service.schemas import WorkerPublic

__all__ = ["router"]

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("", operation_id="list_workers", response_model=list[WorkerPublic])
def list_workers(
    state: StateDep,
    caller: ReadAccess,
    include_stopped: Annotated[bool, Query(description="Also list stopped workers.")] = False,
) -> list[WorkerPublic]:
    """Live workers (or all), newest first: targets (backend, version, compute capability,
    device), labels, slots and the builds each runs now (of the caller's project)."""
    workers = state.queue.workers(include_stopped=include_stopped)
    if caller.visible is None:
        return workers
    return _only_project(state, workers, caller.visible)


def _only_project(state: AppState, workers: list[WorkerPublic], project: str) -> list[WorkerPublic]:
    """The workers with only ``project``'s running builds: another project's build ids are not
    shown (they would tell that it builds, and what)."""
    running = {b for w in workers for b in w.running_builds}
    if not running:
        return workers
    with state.db.session() as session:
        mine = set(
            session.scalars(
                select(BuildRow.id).where(BuildRow.id.in_(running), BuildRow.project == project)
            )
        )
    return [
        w.model_copy(update={"running_builds": [b for b in w.running_builds if b in mine]})
        for w in workers
    ]
