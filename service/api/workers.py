"""``/v1/workers``: the build workers, what each builds for (targets and labels), and what each
runs now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import ReadAccess, StateDep
from service.schemas import WorkerPublic

__all__ = ["router"]

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("", operation_id="list_workers", response_model=list[WorkerPublic])
def list_workers(
    state: StateDep,
    _: ReadAccess,
    include_stopped: Annotated[bool, Query(description="Also list stopped workers.")] = False,
) -> list[WorkerPublic]:
    """Live workers (or all), newest first: targets (backend, version, compute capability,
    device), labels, slots and the builds each runs now."""
    return state.queue.workers(include_stopped=include_stopped)
